"""Bounded read-ahead of a stream's files (`FileStream.prefetch`): `buffer_size` files in flight
on file threads, each file's ranges on range threads (workers.py); its threads stop on `close()`,
when it is dropped, and at interpreter exit.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from activault.errors import FormatError, StorageError
from activault.reading.listing import FileRef
from activault.reading.order import file_priority, read_ahead
from activault.reading.workers import Workers

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Files(Protocol[T_co]):
    """What Prefetch reads from (a FileStream, whose `load` gives a LoadedFile)."""

    buffer_size: int
    skip_bad_files: bool
    unreadable: int

    def order(self, epoch: int) -> Sequence[FileRef]: ...

    def load(
        self,
        f: FileRef,
        epoch: int,
        seq: int,
        ranges: Workers,
        stop: threading.Event,
        turn: tuple[threading.Event | None, threading.Event] | None = None,
    ) -> T_co: ...


class _Then(threading.Event):
    """An event that calls `then` once, on the thread that first sets it."""

    def __init__(self, then: Callable[[], None]):
        super().__init__()
        self._then: Callable[[], None] | None = then
        self._once = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._once:
            then, self._then = self._then, None
        if then is not None:
            then()


def _close(stop: threading.Event, pools: list[Workers]) -> None:
    stop.set()
    for p in pools:
        p.close()


class Prefetch(Iterator[tuple[int, T]]):
    """(index in the epoch's order, loaded file) from file `start` on, `buffer_size` files read ahead.

    Args:
        keep: held while the files are read (the reader whose method the stream's transform is).
        eager: start the next reads before returning a file, so `buffer_size` files are in flight
            while the consumer works (TokenLoader holds a whole window); else one of them starts on
            the next request, and a consumer holds buffer_size files at most (RCache).

    A file asked for while none is in flight (the first) is read on the caller's thread, and the
    files after it are requested once it lets them start (order.next_file_starts): a file thread's
    start and the caller's wake-up were hand-offs of a scheduler slice each on busy cores, and the
    others' thread starts came before the first file's first byte.

    A bad file raises (FormatError or StorageError naming it) unless the stream skips bad files.
    `close()` stops the threads; so does dropping the iterator, and interpreter exit (the threads
    are stopped before modules are torn down, so an abandoned iterator never prints at exit).
    """

    def __init__(self, stream: Files[T], epoch: int, start: int, eager: bool, keep: Any = None):
        self.stream, self.epoch, self.eager = stream, epoch, eager
        self._owner = keep  # the reader, kept while its files are read (FileStream's transform)
        self._next = start
        # (index, its load, its arguments when the caller's thread is to run it, else None)
        self._pending: deque[tuple[int, Future[T], tuple[Any, ...] | None]] = deque()
        self._lock = threading.Lock()  # _refill runs on the caller's thread and where a first file lets the next start
        self._queued: threading.Event | None = None  # set once the last file started has its requests queued
        self._stop = threading.Event()
        self._files = Workers(stream.buffer_size, "activault-read")
        self._ranges = Workers(1, "activault-range")  # grown to each file's ranges (fetch.range_workers)
        self._closer = weakref.finalize(self, _close, self._stop, [self._files, self._ranges])

    def _refill(self, here: bool = False) -> None:
        # The files of the read-ahead plan start together and take turns to queue their first
        # requests (`turn`: order.next_file_starts says when the next one may), so a later file's
        # first range, which can be a whole range of its bytes, queues behind an earlier file's.
        # `here`: the caller waits for the next file: with none in flight, it reads that one itself
        # and the rest are requested when that file's turn lets the next start.
        with self._lock:
            order = self.stream.order(self.epoch)  # re-read: sync() may have appended files
            for i in read_ahead(self._next, len(self._pending), len(order), self.stream.buffer_size):
                if here and not self._pending:
                    turn: tuple[threading.Event | None, threading.Event] = (self._queued, _Then(self._refill))
                    args = (order[i], self.epoch, i, self._ranges, self._stop, turn)
                    self._queued, self._next = turn[1], i + 1
                    self._pending.append((i, Future(), args))
                    return
                turn = (self._queued, threading.Event())
                self._queued = turn[1]
                args = (order[i], self.epoch, i, self._ranges, self._stop, turn)
                self._pending.append((i, self._files.submit(file_priority(i), self.stream.load, *args), None))
                self._next = i + 1

    def _take(self) -> tuple[int, Future[T]] | None:
        """The next file's index and load (run here if it is this thread's to read), or None at the end."""
        with self._lock:
            if not self._pending:
                return None
            index, future, args = self._pending[0]
        if args is not None and future.set_running_or_notify_cancel():
            try:  # still pending meanwhile: the files it lets start count it as in flight
                future.set_result(self.stream.load(*args))
            except BaseException as e:  # noqa: BLE001 - raised below, as a file thread's would be
                future.set_exception(e)
        with self._lock:
            self._pending.popleft()
        return index, future

    def __next__(self) -> tuple[int, T]:
        while True:
            self._refill(here=True)
            taken = self._take()
            if taken is None:
                self.close()
                raise StopIteration
            index, future = taken
            try:
                item = future.result()
            except (FormatError, StorageError) as e:
                if not self.stream.skip_bad_files:
                    self.close()
                    raise
                self.stream.unreadable += 1
                warnings.warn(f"skipping a bad file: {e}", stacklevel=2)
                continue
            if self.eager:
                self._refill()
            return index, item

    def close(self) -> None:
        """Stop reading ahead now and wait for the threads to end."""
        self._closer()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
