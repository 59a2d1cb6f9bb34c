"""The readers' thread pool: daemon threads running submitted calls, lowest priority first.

File loads and their byte ranges go through it (fetch.py, stream.py, prefetch.py), so an earlier
file's ranges run before a later file's; `close()` cancels what has not started.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Stopped(Exception):
    """Background work cancelled because the stream was closed."""


Job = tuple[tuple[int, ...], int, Any]


class Workers:
    """Daemon threads running submitted calls, lowest priority first; close() cancels the rest.

    Threads start as the jobs need them, up to `workers` (`grow` raises the bound): a stream of
    mapped files, which never submits a range, starts none (starting one took ~0.7 ms on this
    project's busy VM, 10 of them a fifth of a 256 MB file's read from the page cache).
    """

    def __init__(self, workers: int, name: str):
        self.limit, self.name = workers, name
        self._jobs: list[Job] = []  # a heap
        self._count = itertools.count()
        self._cond = threading.Condition()
        self._idle = 0  # threads waiting for a job
        self._closed = False
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def grow(self, workers: int) -> None:
        """Allow up to `workers` threads (never fewer than now)."""
        with self._cond:
            self.limit = max(self.limit, workers)
            self._spawn()

    def submit(self, priority: tuple[int, ...], fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                future.cancel()
            else:
                heapq.heappush(self._jobs, (priority, next(self._count), (future, fn, args)))
                self._spawn()
                self._cond.notify()
        return future

    def _spawn(self) -> None:
        """Start threads for the jobs no idle thread will take, within the bound (lock held)."""
        while len(self._jobs) > self._idle and len(self._threads) < self.limit:
            t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            self._idle += 1  # counted idle until it takes a job, so the next submit counts it
            t.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:  # closed
                    self._idle -= 1
                    return
                job = heapq.heappop(self._jobs)[2]
                self._idle -= 1
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(e)
            del job, future, fn, args  # the result (a file's buffers) is the waiter's alone
            with self._cond:
                self._idle += 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._jobs:  # cancel what has not started: its waiters wake up with CancelledError
                job[2][0].cancel()
            self._jobs.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join()
