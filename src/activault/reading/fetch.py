"""How a megabatch file's bytes are read: header first, then parallel ranges into a recycled buffer,
or, for a file the store maps (local files) that the page cache holds, read in place: one copy fewer.

Header and body come from one version of the file (`Store.open`): a file replaced meanwhile
(recompress) is read old or new, never mixed; where the old one is gone (S3), the read starts again.

Transient storage failures are retried by the store itself (S3Store: visibly, within the budget
of its `retry_timeout` / `max_retries` options, then one error naming the endpoint).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from activault.errors import FormatError, NotFoundError, StorageError
from activault.reading.buffers import ReadBuffers
from activault.reading.order import range_priority
from activault.reading.residency import resident
from activault.reading.workers import Stopped, Workers
from activault.storage import Store
from activault.storage.base import REREADS, ObjectChanged, ObjectHandle, populate
from activault.storage.local import LocalStore
from activault.vault import megabatch as fmt
from activault.vault import records

# At most 16 MiB per ranged read: one connection to AWS moves ~90 MB/s (LINK_RATE). A file is split
# over its range workers (ranges of at least MIN_RANGE), so its ranges run together and it arrives
# before the next file's (first batch: one file's time, not two). Local storage (a first byte in
# under REMOTE_FIRST_BYTE) reads in RANGE_WORKERS ranges: more only add thread hops. Remote storage
# caps each connection, so a big file gets one range per RANGE_SIZE, up to MAX_RANGE_WORKERS (the
# original opened 16 per 256 MB file), and ranges of half that size where the first byte takes
# SLOW_FIRST_BYTE or more (more connections hide it: 8 MiB at 90 MB/s + 30 ms is 76% busy per
# connection, 32 of them move 1.8x what 16 ranges of 16 MiB do).
RANGE_SIZE = 16 << 20
MIN_RANGE = 4 << 20
RANGE_WORKERS = 8
MAX_RANGE_WORKERS = 32
LINK_RATE = 90e6
REMOTE_FIRST_BYTE = 0.005
SLOW_FIRST_BYTE = 0.025
# The header (a few hundred bytes) comes first in one small read: a junk multi-GB object in a hook
# folder costs this much before it is refused, never its size. A file that one request covers
# (at most the range size) is read whole, in that one request, and its header checked from it.
# A file no bigger than a full file of its hook (the tensor bytes its metadata gives, `expect`, plus
# HEAD_BYTES) is requested whole at once, its header checked from the first range: one round trip
# instead of two (on moto, whose ranged GETs each read the whole object, the header's small read
# cost as much as the file), and junk costs at most one well-formed file's bytes.
HEAD_BYTES = 64 << 10
# A reader that gathers across the files it holds (TokenLoader: `read_cold`) asks the kernel to read
# a mapped file ahead whole (MADV_WILLNEED) where the page cache holds less than RESIDENT of it
# (`residency.resident`): mapped alone, its loading thread faults it in front to back while the
# gather takes the cores, and the disk idles. Measured against reading such files by parallel
# preads into recycled buffers, which this replaced (docs/benchmarks.md, "Cold files"): 4 files of
# 64 / 256 MiB, quiet machine 1.55 / 2.29 GB/s against 1.16 / 1.20, with two CPU burners beside it
# 1.55 / 2.12 against 1.02 / 1.23, the first batch in half the time (no fresh buffer to fault in).
# RCache, which hands each file over whole, maps as it is: the kernel's read-ahead serves its one
# sequential reader well.
RESIDENT = 0.75
# A local file the store does not map (`map_reads=False`, pinned buffers for CUDA) is read in ranges
# of at least LOCAL_RANGE, one per core at most: from the page cache one 64 MiB pread took 40-54 ms
# into a fresh buffer, 8 parallel 8 MiB ones 450-550 ms each (8 threads faulting one buffer in on
# 2 cores), and every range is a hand-off to a range worker (docs/benchmarks.md, third session).
LOCAL_RANGE = 64 << 20


def read_ahead(mapping: mmap.mmap) -> None:
    """Ask the kernel to read the whole mapped file into the page cache now, at the disk's queue
    depth and without a thread of ours, while the loading thread reads it in place front to back
    (a hint: refused, the reads fault the pages in as they come)."""
    try:
        mapping.madvise(mmap.MADV_WILLNEED)
    except (AttributeError, OSError):
        pass


def local_step(size: int, range_size: int | None = None) -> int:
    """Bytes per read of a `size`-byte local file read by copy: `range_size` if set, else the file
    in one range per whole LOCAL_RANGE it holds, one per core at most (whole pages): a file of 64
    MiB of states and its header, ids and positions in one read."""
    if range_size is not None:
        return range_size
    ranges = max(1, min(os.cpu_count() or 1, size // LOCAL_RANGE))
    share = -(-size // ranges)
    return -(-share // 4096) * 4096


def range_workers(size: int, first_byte: float | None = None) -> int:
    """Ranges of a `size`-byte file in flight at once, given the storage's first-byte latency in
    seconds (None: not measured yet: RANGE_WORKERS, so a local stream's first file never starts
    threads it will not use; its reads measure it for the next file)."""
    if first_byte is None or first_byte < REMOTE_FIRST_BYTE:
        return min(MAX_RANGE_WORKERS, RANGE_WORKERS)
    per = RANGE_SIZE // 2 if first_byte >= SLOW_FIRST_BYTE else RANGE_SIZE
    return min(MAX_RANGE_WORKERS, max(RANGE_WORKERS, -(-size // per)))


def range_step(size: int, range_size: int | None = None, first_byte: float | None = None) -> int:
    """Bytes per ranged read of a `size`-byte file: `range_size` if set, else the file split over
    `range_workers` in ranges of MIN_RANGE to RANGE_SIZE (whole pages)."""
    if range_size is not None:
        return range_size
    share = -(-size // range_workers(size, first_byte))
    return min(RANGE_SIZE, max(MIN_RANGE, -(-share // 4096) * 4096))


class FirstByte:
    """A stream's estimate of its storage's first-byte latency: the least (seconds - bytes /
    LINK_RATE) over its reads (None before the first). The least, because queueing and a busy CPU
    only ever add to a read's time."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._lock = threading.Lock()

    def observe(self, seconds: float, nbytes: int) -> None:
        estimate = max(0.0, seconds - nbytes / LINK_RATE)
        with self._lock:
            self.seconds = estimate if self.seconds is None else min(self.seconds, estimate)


class ObjectReader:
    """Reads one stored object for a FileStream: `head()` (checked by the caller), then `body()`,
    both from the version `open()` found. A body that raises ObjectChanged (S3: the version is
    gone) is read again from the start by the caller, with a new reader."""

    def __init__(
        self,
        store: Store,
        key: str,
        size: int,
        *,
        stop: threading.Event,
        range_size: int | None = None,
        expect: int | None = None,
        first_byte: FirstByte | None = None,
        read_cold: bool = False,
    ):
        self.store, self.key, self.size = store, key, size  # the listed size, until opened
        self.url = store.url(key)
        self.first_byte = first_byte if first_byte is not None else FirstByte()  # shared by a stream's readers
        self.stop, self.range_size = stop, range_size
        self.step = range_step(size, range_size, self.first_byte.seconds)
        self.expect = expect  # tensor bytes of a full file of this hook (None: unknown)
        self.read_cold = read_cold  # a mapped file the page cache lacks is read ahead whole (RESIDENT)
        self._local = False  # local storage (mapped or not), whose first byte is no network's
        self._whole: torch.Tensor | None = None  # the file, when requested whole with its header
        self._rest: list[Future[Any]] = []  # its other ranges, when requested with the header
        self._map: mmap.mmap | None = None  # the file, when the store maps it
        self._obj: ObjectHandle | None = None  # the version read, once opened
        self._listed: int | None = size  # trusted until the store says otherwise

    def read(self, start: int, out: memoryview, obj: ObjectHandle | None = None) -> None:
        """Fill `out` with bytes [start, start + len(out)) of the version opened (`obj`: the one
        this range was requested from); a short read means a truncated file."""
        if self.stop.is_set():
            raise Stopped
        obj = obj or self._obj
        assert obj is not None, "open() first"
        want = out.nbytes
        try:
            began = time.perf_counter()
            got = obj.read_into(start, out)
            self.first_byte.observe(time.perf_counter() - began, got)
        except NotFoundError:
            raise NotFoundError(f"{self.url} does not exist (it was listed: deleted since?)") from None
        if got < want:  # the version opened ends early: a short file, not a replaced one
            raise self._truncated(start + got)

    def head(
        self,
        buffers: ReadBuffers,
        ranges: Workers | None = None,
        priority: tuple[int, ...] = (),
        started: Callable[[], None] = lambda: None,
    ) -> tuple[memoryview, fmt.Header | None]:
        """The first bytes and the validated header (None: a legacy file).

        The header is checked (`megabatch.parse_header`, every reader's one validator) against
        the size of the version opened (not the listing's) before the file's bytes are used. A
        file the store maps (`Store.map`: local files, unless pinned buffers are wanted for CUDA)
        is read in place; else a file that fits one request is read whole by it, into a recycled
        buffer; else a file no bigger than `expect` allows is requested whole (its other ranges
        go to `ranges` with `priority`); else only its header is read first, and no tensor byte
        is requested before it is valid.
        `started()` is called once the requests made before the header is checked are queued.
        A file replaced before its header is read (it is not the listed size, or a new version
        came between the header's reads) is opened again, up to REREADS times.
        """
        pending = [started]

        def once() -> None:  # the caller counts this file's first requests once, not per attempt
            while pending:
                pending.pop()()

        for attempt in range(1, REREADS + 1):
            try:
                self.open(buffers)
                return self._head(buffers, ranges, priority, once)
            except ObjectChanged:
                self.abandon()
                if attempt == REREADS:
                    raise self._changed() from None
                self._obj, self._listed = None, None  # its size as the store has it now
            except BaseException:
                self.abandon()
                raise
        raise AssertionError("unreachable")

    def open(self, buffers: ReadBuffers) -> bool:
        """Map the file where the store can (with `read_cold`, one mostly on disk is read ahead by the
        kernel: RESIDENT), reading none of it here; True if it is mapped: its head and body are then
        read in place on the calling thread, range after range.

        One thread reading a mapped file front to back beat its ranges split over the range
        workers: from the page cache they cost more in thread hops than the reads themselves.
        """
        if self._obj is None:
            try:
                self._obj = obj = self.store.open(self.key, self._listed)
            except NotFoundError:
                raise NotFoundError(f"{self.url} does not exist (it was listed: deleted since?)") from None
            self.size, self.step = obj.size, range_step(obj.size, self.range_size, self.first_byte.seconds)
            if self.size == 0:
                raise FormatError(f"{self.url}: empty file (0 bytes); {self._fix()}")
            if not buffers.pin:  # pinned buffers copy to the GPU asynchronously: read into those
                mapping = obj.map()
                if mapping is not None:
                    # A slow cold disk is no slow network: its ranges stay RANGE_WORKERS (more only
                    # seek); measured as remote, a cold 256 MiB file went to 32 ranges at 0.2 GB/s.
                    self._local, self.step = True, range_step(obj.size, self.range_size)
                if mapping is not None and self.read_cold and resident(mapping) < RESIDENT:
                    read_ahead(mapping)  # mostly on disk (RESIDENT)
                self._map = mapping
                if mapping is not None:
                    obj.close()  # the mapping holds the version now
            if self._map is None and not self._local and isinstance(self.store, LocalStore):
                self._local, self.step = True, local_step(obj.size, self.range_size)  # read by copy
        return self._map is not None

    @property
    def local(self) -> bool:
        """The store serves this file locally (mapped or read by copy): no network's first byte,
        and its reads cost the CPU they share with the reader, not a connection's wait."""
        return self._local

    @property
    def workers(self) -> int:
        """Range workers for this file (`range_workers`; the files read ahead request their heads
        together, so never fewer than RANGE_WORKERS; a local file RANGE_WORKERS)."""
        return range_workers(self.size, None if self._local else self.first_byte.seconds)

    def _head(
        self, buffers: ReadBuffers, ranges: Workers | None, priority: tuple[int, ...], started: Callable[[], None]
    ) -> tuple[memoryview, fmt.Header | None]:
        if self._map is not None:
            started()
            head = self._view(0, min(self.size, HEAD_BYTES))
        else:
            expected = self.expect is not None and self.size <= self.expect + HEAD_BYTES
            whole = self.size <= self.step or (ranges is not None and expected)
            if whole:
                self._whole = buffers.bytes(self.size)
                view = self._whole.numpy().data.cast("B")
                head = view[: self.step]
                if ranges is not None:
                    self._rest = [
                        ranges.submit(range_priority(priority, s), self.read, s, view[s : s + self.step], self._obj)
                        for s in range(self.step, self.size, self.step)
                    ]
            else:
                head = memoryview(bytearray(min(self.size, HEAD_BYTES)))
            started()
            self.read(0, head)
        if self.key.endswith(fmt.LEGACY_SUFFIX):
            return head, None
        n = fmt.header_length(head[:8], self.url)
        if n > self.size:
            raise FormatError(
                f"{self.url}: corrupted header (declares {n - 8} bytes, the file has {self.size}); {self._fix()}"
            )
        if n > head.nbytes:  # a header over the first read: read the rest of it, still no tensor bytes
            if self._map is not None:
                head = self._view(0, n)
            else:
                more = bytearray(n)
                more[: head.nbytes] = head
                self.read(head.nbytes, memoryview(more)[head.nbytes :])
                head = memoryview(more)
        return head, fmt.parse_header(head, self.url, self.size)

    def abandon(self) -> None:
        """Cancel the ranges requested (the file was refused, or its read failed). The version
        is let go of once the ranges already running are done with it."""
        for fut in self._rest:
            fut.cancel()
        self._rest, self._whole, self._map = [], None, None

    def _changed(self) -> ObjectChanged:
        return ObjectChanged(
            f"{self.url} was replaced {REREADS} times while it was read: something keeps rewriting it; "
            "read it again once that is done"
        )

    def _view(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) of the mapped file, read in now (`populate`: an error, never SIGBUS)."""
        assert self._map is not None
        self._populate(self._map, start, end)
        return memoryview(self._map)[start:end]

    def _populate(self, mapping: mmap.mmap, start: int, end: int) -> None:
        if self.stop.is_set():
            raise Stopped
        try:
            populate(mapping, start, end)
        except OSError as e:
            if e.errno == errno.EFAULT:  # the file no longer reaches `end`
                raise self._truncated(None) from None
            raise StorageError(f"cannot read {self.url}: {e.strerror or e}") from e

    def _truncated(self, ends_at: int | None) -> FormatError:
        """The version opened is shorter than it said: truncated in place (activault never does)."""
        where = "ends early" if ends_at is None else f"ends at byte {ends_at}"
        return FormatError(f"{self.url}: truncated file ({where}, {self.size} bytes when opened); {self._fix()}")

    def _fix(self) -> str:
        """The repair of this damaged file: its machine's damaged files collected again (`records`)."""
        if records.parse_file_name(self.key) is None:  # the original Activault's: nothing here rewrites it
            return "read the other files with skip_bad_files=True"
        return records.file_repair(self.url.rsplit("/", 2)[0], self.key)

    def body(
        self, head: memoryview, buffers: ReadBuffers, ranges: Workers, priority: tuple[int, ...]
    ) -> Callable[[], torch.Tensor]:
        """Start reading the rest into a recycled buffer; returns a call that waits for the bytes.

        Each range goes to `ranges` with `priority` (file, hook) first, so an earlier file is
        never starved by a later one. A mapped file is read by the call itself, in place.
        """
        if self._whole is not None:  # head() read it all, or requested it all
            whole, self._whole = self._whole, None
            return _waiter(self._rest, lambda: whole, self._done)
        step = self.step
        if self._map is not None:  # mapped: read in place by the waiting thread, in order (see open)
            mapping, self._map = self._map, None
            size = self.size

            def in_place() -> torch.Tensor:
                for s in range(head.nbytes, size, step):
                    self._populate(mapping, s, min(s + step, size))
                self._done()
                return torch.frombuffer(mapping, dtype=torch.uint8, count=size)

            return in_place
        buf = buffers.bytes(self.size)
        view = buf.numpy().data.cast("B")
        view[: head.nbytes] = head
        self._rest = [
            ranges.submit(range_priority(priority, s), self.read, s, view[s : s + step], self._obj)
            for s in range(head.nbytes, self.size, step)
        ]
        return _waiter(self._rest, lambda: buf, self._done)

    def _done(self) -> None:
        """Every byte is read: let go of the version (a local file's descriptor)."""
        self._rest = []
        if self._obj is not None:
            self._obj.close()


def _waiter(
    futures: list[Future[Any]], result: Callable[[], torch.Tensor], done: Callable[[], None]
) -> Callable[[], torch.Tensor]:
    """A call that waits for every range (cancelling the rest on the first error), then calls
    `done` and gives the bytes."""

    def wait() -> torch.Tensor:
        try:
            for fut in futures:
                fut.result()
        finally:
            for fut in futures:
                fut.cancel()
        done()
        return result()

    return wait
