"""Bounded background writing under `RunWriter`: `Writer` (a write pool and one commit thread) and
`StagingBuffers`.

Memory is bounded by `StagingBuffers`: the producer cannot fill a new megabatch until a written one
comes back, so when storage is slower than the model the model waits. A failed write is raised at
the next `write`, `commit`, `flush` or `close`: the run stops with the error instead of losing data.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import torch

from activault.storage.base import Buffer, Store


class StagingBuffers:
    """A fixed set of reusable host buffers a megabatch is filled in; `acquire` blocks until one is free."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, count: int, pin: bool = False):
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(tuple(shape), dtype=dtype, pin_memory=pin))
        self.shape = tuple(shape)
        self.dtype = dtype
        self.waited = 0.0  # seconds `acquire` blocked: the caller waiting for storage

    def acquire(self, check: Callable[[], None] | None = None) -> torch.Tensor:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    return self._free.get(timeout=0.5)
                except queue.Empty:
                    if check is not None:
                        check()  # a failed write would otherwise leave us waiting for a buffer forever
        finally:
            self.waited += time.perf_counter() - t0

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def _succeeded(fut: Future[None]) -> bool:
    """Wait for `fut`; whether it ran without error. Also wakes when it is cancelled, which
    `concurrent.futures.wait` does not: a future cancelled by `shutdown(cancel_futures=True)`
    never notifies it, and a commit waiting on a dropped write would hang abort() forever."""
    try:
        return fut.exception() is None
    except CancelledError:
        return False


class Writer:
    """Writes objects on a thread pool and runs commit callbacks in submission order."""

    def __init__(self, store: Store, threads: int = 4):
        self.store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="activault-write")
        # One thread: commits (progress records) land in order, each after the data it counts.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="activault-commit")
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.bytes_written = 0

    def check(self) -> None:
        """Raise the first failed write's error, if any."""
        if self._error is not None:
            raise self._error

    def _track(self, fut: Future[None]) -> Future[None]:
        with self._lock:
            self._pending.add(fut)

        def done(f: Future[None]) -> None:
            with self._lock:
                self._pending.discard(f)
                if f.exception() is not None and self._error is None:
                    self._error = f.exception()

        fut.add_done_callback(done)
        return fut

    def write(
        self,
        key: str,
        parts: Sequence[Buffer] | Callable[[], Sequence[Buffer]],
        on_done: Callable[[], None] | None = None,
    ) -> Future[None]:
        """Queue one object; `on_done` runs after it is written or has failed (e.g. to free a buffer).

        `parts` may be a function that builds them: it runs on a writer thread (compression), never
        on the caller's.
        """
        self.check()

        def run() -> None:
            try:
                data = parts() if callable(parts) else parts
                self.store.put(key, data)
                with self._lock:
                    self.bytes_written += sum(memoryview(p).nbytes for p in data)
            finally:
                if on_done is not None:
                    on_done()

        return self._track(self._pool.submit(run))

    def commit(self, after: Sequence[Future[None]], fn: Callable[[], None]) -> Future[None]:
        """Run `fn` once every future in `after` succeeded and every earlier commit ran."""
        self.check()

        def run() -> None:
            if all(_succeeded(f) for f in list(after)) and self._error is None:
                fn()  # else: the write's own error is what the caller sees, or abort() dropped it

        return self._track(self._committer.submit(run))

    def flush(self) -> None:
        """Wait for everything queued so far; raise the first error."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            for f in pending:
                _succeeded(f)
        self.check()

    def close(self) -> None:
        """Finish queued work and stop the threads; raise the first error."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._committer.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop without raising: drop queued work, wait for running writes to end."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._committer.shutdown(wait=True, cancel_futures=True)
