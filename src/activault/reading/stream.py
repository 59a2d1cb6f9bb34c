"""The streaming layer under RCache and TokenLoader: which files, in which order, read how.

`FileStream` lists the megabatch files of one or more sources (present in every hook), orders
them per epoch, seed and rank, and reads them ahead: each file's header first (one small read,
checked before any tensor byte is fetched), then its body by parallel ranged reads straight into a
recycled buffer, decoded in place (the tensors are views of that buffer). `Prefetch` is the
bounded read-ahead; its threads stop on `close()`, when it is dropped, and at interpreter exit.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import warnings
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activault.errors import ConfigError, FormatError, NotFoundError, StorageError
from activault.reading.listing import Catalog, FileRef, Prefix, StatesShape
from activault.storage import Store
from activault.vault import megabatch as fmt

# 16 MiB ranges: one connection to AWS moves ~90 MB/s, so 8 in flight fill a 5 Gbit/s NIC.
RANGE_SIZE = 16 << 20
RANGE_WORKERS = 8
# The header (a few hundred bytes) comes first in one small read: a junk multi-GB object in a hook
# folder costs this much before it is refused, never its size.
HEAD_BYTES = 64 << 10
# Recycle read and batch buffers (BufferPool); bench/read.py measures it off.
RECYCLE_BUFFERS = True

Source = str | Path | Store

__all__ = [
    "RANGE_SIZE", "BufferPool", "Catalog", "FileRef", "FileStream", "Megabatch", "Prefetch", "Prefix",
    "Reader", "Source", "StatesShape", "check_device", "mix_seed",
]  # fmt: skip


@dataclass
class Megabatch:
    """One file's tensors, every hook's states for the same tokens."""

    states: list[torch.Tensor]  # per hook: [rows, seq, d]
    input_ids: torch.Tensor  # [rows, seq] (int32 as stored)
    positions: torch.Tensor  # [rows, seq] int32, -1 = padding


class Stopped(Exception):
    """Background work cancelled because the stream was closed."""


def check_device(device: str | torch.device) -> torch.device:
    """The device to deliver tensors on; a CUDA device on a machine without one is refused now."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={str(device)!r} but this machine has no usable CUDA device; use device='cpu'"
        )
    return dev


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (Python's hash() of a str is salted per process)."""
    text = ":".join(map(str, parts)).encode()
    return zlib.crc32(text) | (zlib.adler32(repr(parts).encode()) << 32)


class BufferPool:
    """Byte buffers handed out as tensors and handed out again once nothing uses them.

    A fresh buffer costs a page fault per page on first touch: on this project's VM, filling a
    fresh 64 MiB buffer took 26 ms median (numpy, huge pages) to 136 ms (torch, 4 KiB pages).
    Measured by bench/read.py (16 files of 64 MiB, local store, 5 reps, medians): RCache reads at
    0.85x raw with recycled buffers, 0.39x with a fresh buffer per file (warm cache; cold: 0.88x
    vs 0.51x). A tensor made from a numpy array keeps that array alive, so once the weak
    reference to the array given out is dead, no tensor (or view of one) uses the memory any more.
    Pinned buffers come from CUDA's caching host allocator, which already reuses blocks.
    """

    def __init__(self, pin: bool = False, keep: int = 4, recycle: bool | None = None):
        self.pin, self.keep = pin, keep
        self.recycle = RECYCLE_BUFFERS if recycle is None else recycle
        self._slots: list[tuple[np.ndarray, weakref.ref[np.ndarray]]] = []
        self._lock = threading.Lock()

    def bytes(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes`, contents undefined."""
        if self.pin:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if not self.recycle:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            mem = next((m for m, ref in self._slots if ref() is None and m.nbytes == nbytes), None)
            if mem is not None:
                self._slots = [s for s in self._slots if s[0] is not mem]
            else:
                mem = np.empty(nbytes, np.uint8)
                if len(self._slots) >= self.keep:
                    self._slots.pop(0)  # still in use: the consumer's tensors keep it alive
            given = mem[:]
            self._slots.append((mem, weakref.ref(given)))
        return torch.from_numpy(given)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self.bytes(n * dtype.itemsize).view(dtype).view(shape)


class _Pool:
    """Daemon threads running submitted calls, lowest priority first; close() cancels the rest."""

    def __init__(self, workers: int, name: str):
        self._queue: queue.PriorityQueue[tuple[tuple[int, ...], int, Any]] = queue.PriorityQueue()
        self._count = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=_work, args=(self._queue,), name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, priority: tuple[int, ...], fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                future.cancel()
            else:
                self._queue.put((priority, next(self._count), (future, fn, args)))
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while True:  # cancel what has not started: its waiters wake up with CancelledError
                try:
                    self._queue.get_nowait()[2][0].cancel()
                except queue.Empty:
                    break
            for _ in self._threads:
                self._queue.put(((-1,), next(self._count), None))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()


def _work(jobs: queue.PriorityQueue[tuple[tuple[int, ...], int, Any]]) -> None:
    while True:
        job = jobs.get()[2]
        if job is None:
            return
        future, fn, args = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)
        del job, future, fn, args  # the result (a file's buffers) is the waiter's alone


def _close_pools(stop: threading.Event, pools: list[_Pool]) -> None:
    stop.set()
    for p in pools:
        p.close()


class FileStream:
    """Megabatch files of one or more sources, listed, ordered and read: what RCache and TokenLoader share.

    Args: as RCache (`uri`, `hooks`, `buffer_size`, `preserve_file_order`, `seed`, `rank`,
        `world_size`, `skip_bad_files`, `store_options`, `range_size`); `pin`: read into pinned
        memory (for CUDA); `transform`: applied to each megabatch on the reading thread;
        `held`: files the consumer holds at once (their buffers are kept for reuse).
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        *,
        hooks: Sequence[str] | None = None,
        buffer_size: int = 2,
        preserve_file_order: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_bad_files: bool = False,
        store_options: dict[str, Any] | None = None,
        range_size: int | None = None,
        pin: bool = False,
        held: int = 1,
        transform: Callable[[FileRef, int, Megabatch], Megabatch]
        | None = None,  # (file, epoch, item)
    ):
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.catalog = Catalog(uri, hooks=hooks, store_options=store_options)
        self.hooks = self.catalog.hooks
        self.buffer_size = buffer_size
        self.preserve_file_order = preserve_file_order
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.skip_bad_files = skip_bad_files
        self.bad_files = 0
        self.range_size = range_size
        self.pin = pin
        self.transform = transform
        self.buffers = BufferPool(pin, keep=buffer_size + held + 1)
        self._shape_lock = threading.Lock()
        self._order_cache: tuple[tuple[int, int], list[FileRef]] | None = None

    @property
    def shapes(self) -> list[StatesShape | None]:
        """Per hook, the shape every file's states must have (None until known: legacy files)."""
        return self.catalog.shapes

    def sync(self) -> int:
        """Pick up files written since the last listing (appended after the known ones); returns how many."""
        return self.catalog.sync()

    def order(self, epoch: int) -> list[FileRef]:
        """This rank's files in reading order for `epoch`."""
        key = (epoch, len(self.catalog.blocks))
        if self._order_cache is None or self._order_cache[0] != key:
            out: list[FileRef] = []
            for b, block in enumerate(self.catalog.blocks):
                block = list(block)
                if not self.preserve_file_order:
                    random.Random(mix_seed(self.seed, epoch, b)).shuffle(block)
                out += block
            self._order_cache = (key, out[self.rank :: self.world_size])
        return self._order_cache[1]

    def prefetch(self, epoch: int, start: int = 0, eager: bool = False) -> Prefetch:
        """The files of `epoch` from index `start` on, read ahead (see Prefetch)."""
        return Prefetch(self, epoch, start, eager)

    # -- one file ----------------------------------------------------------------------------------

    def load(
        self, f: FileRef, epoch: int, seq: int, ranges: _Pool, stop: threading.Event
    ) -> Megabatch:
        """Every hook's file `f.name` of source `f.source`, decoded and checked against the others."""
        prefix = self.catalog.prefixes[f.source]
        parts = [
            self._fetch(prefix, h, f.name, size, (seq, h), ranges, stop)
            for h, size in enumerate(f.sizes)
        ]
        states: list[torch.Tensor] = []
        ids = pos = None
        first_url = ""
        for h, part in enumerate(parts):
            url = prefix.url(h, f.name)
            tensors, _ = fmt.decode(part(), url)
            s, i, p = self._check(tensors, url, h)
            if ids is None:
                ids, pos, first_url = i, p, url
            elif not torch.equal(ids, i):
                raise FormatError(
                    f"{url}: input_ids differ from {first_url}: these hooks do not hold the same tokens"
                )
            states.append(s)
        assert ids is not None and pos is not None
        item = Megabatch(states, ids, pos)
        return self.transform(f, epoch, item) if self.transform is not None else item

    def _fetch(
        self,
        prefix: Prefix,
        h: int,
        name: str,
        size: int,
        priority: tuple[int, int],
        ranges: _Pool,
        stop: threading.Event,
    ) -> Callable[[], memoryview]:
        """Start reading one object; returns a call that waits for its bytes.

        The header is read and checked first, so the body's ranges are only requested for a file
        that fits its listed size; each range goes to `ranges` with `priority` (file, hook) first,
        so an earlier file is never starved by a later one.
        """
        store, key, url = prefix.store, prefix.key(h, name), prefix.url(h, name)
        if stop.is_set():
            raise Stopped
        if size == 0:
            raise FormatError(f"{url}: empty file (0 bytes); delete it and collect again")
        legacy = name.endswith(fmt.LEGACY_SUFFIX)
        step = self.range_size or RANGE_SIZE
        head = bytearray(min(size, HEAD_BYTES, step))
        _read(store, key, 0, memoryview(head), url)
        if not legacy:
            self._check_header(store, key, head, size, url, h)
        buf = self.buffers.bytes(size)
        view = buf.numpy().data.cast("B")
        view[: len(head)] = head
        futures = [
            ranges.submit(
                (*priority, s), _read_checked, store, key, s, view[s : s + step], url, stop
            )
            for s in range(len(head), size, step)
        ]

        def wait() -> memoryview:
            try:
                for fut in futures:
                    fut.result()
            finally:
                for fut in futures:
                    fut.cancel()
            return view

        return wait

    def _check_header(
        self, store: Store, key: str, head: bytearray, size: int, url: str, h: int
    ) -> None:
        """The header's tensors fit the listed size exactly and `states` has this hook's shape."""
        n = fmt.header_length(bytes(head[:8]), url)
        if n > size:
            raise FormatError(
                f"{url}: corrupted header (declares {n - 8} bytes, file has {size}); delete it and collect again"
            )
        if n > len(head):  # a header over HEAD_BYTES: read the rest of it, still no tensor bytes
            more = bytearray(n - len(head))
            _read(store, key, len(head), memoryview(more), url)
            head += more
        header, start = fmt.read_header(head, url)
        specs = fmt.tensor_specs(header, size - start, url)
        states = specs.get("states")
        if states is None or len(states[1]) != 3:
            raise FormatError(f"{url}: no 'states' tensor of shape [rows, seq, d]")
        self._expect(StatesShape(states[1][1], states[1][2], states[0]), url, h)

    def _expect(self, shape: StatesShape, url: str, h: int) -> None:
        with self._shape_lock:
            expected = self.catalog.shapes[h] = self.catalog.shapes[h] or shape
        if shape != expected:
            raise FormatError(
                f"{url}: states are {shape}, the other files {expected}: it does not belong here"
            )

    def _check(
        self, tensors: dict[str, torch.Tensor], url: str, h: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states = tensors.get("states")
        if states is None or states.dim() != 3:
            raise FormatError(f"{url}: no 'states' tensor of shape [rows, seq, d]")
        self._expect(StatesShape(states.shape[1], states.shape[2], states.dtype), url, h)
        ids = tensors.get("input_ids")
        if ids is None or ids.shape != states.shape[:2]:
            raise FormatError(f"{url}: no 'input_ids' tensor of shape {list(states.shape[:2])}")
        pos = tensors.get("positions")
        if pos is None:  # legacy files: position within the row
            pos = torch.arange(states.shape[1], dtype=torch.int32).expand(states.shape[0], -1)
        elif pos.shape != states.shape[:2]:
            raise FormatError(
                f"{url}: 'positions' has shape {list(pos.shape)}, expected {list(states.shape[:2])}"
            )
        return states, ids, pos


def _read(store: Store, key: str, start: int, out: memoryview, url: str) -> None:
    """Fill `out` with bytes [start, start + len(out)) of an object; a short read means a truncated file."""
    want = out.nbytes
    try:
        got = store.read_into(key, start, out)
    except NotFoundError:
        raise NotFoundError(f"{url} does not exist (it was listed: deleted since?)") from None
    if got < want:
        raise FormatError(
            f"{url}: truncated file (ends at byte {start + got}, listed with more); delete it and collect again"
        )


def _read_checked(
    store: Store, key: str, start: int, out: memoryview, url: str, stop: threading.Event
) -> None:
    if stop.is_set():
        raise Stopped
    _read(store, key, start, out, url)


class Prefetch(Iterator[tuple[int, Megabatch]]):
    """(index in the epoch's order, megabatch) from file `start` on, `buffer_size` files read ahead.

    Args:
        eager: start the next reads before returning a file, so `buffer_size` files are in flight
            while the consumer works (TokenLoader holds a whole window); else one of them starts on
            the next request, and a consumer holds buffer_size files at most (RCache).

    A bad file raises (FormatError or StorageError naming it) unless the stream skips bad files.
    `close()` stops the threads; so does dropping the iterator, and interpreter exit (the threads
    are stopped before modules are torn down, so an abandoned iterator never prints at exit).
    """

    def __init__(self, stream: FileStream, epoch: int, start: int, eager: bool):
        self.stream, self.epoch, self.eager = stream, epoch, eager
        self._next = start
        self._pending: deque[tuple[int, Future[Megabatch]]] = deque()
        self._stop = threading.Event()
        self._files = _Pool(stream.buffer_size, "activault-read")
        self._ranges = _Pool(RANGE_WORKERS, "activault-range")
        self._closer = weakref.finalize(self, _close_pools, self._stop, [self._files, self._ranges])

    def _refill(self) -> None:
        order = self.stream.order(self.epoch)  # re-read: sync() may have appended files
        while len(self._pending) < self.stream.buffer_size and self._next < len(order):
            i = self._next
            fut = self._files.submit(
                (i,), self.stream.load, order[i], self.epoch, i, self._ranges, self._stop
            )
            self._pending.append((i, fut))
            self._next += 1

    def __next__(self) -> tuple[int, Megabatch]:
        while True:
            self._refill()
            if not self._pending:
                self.close()
                raise StopIteration
            index, future = self._pending.popleft()
            try:
                item = future.result()
            except (FormatError, StorageError) as e:
                if not self.stream.skip_bad_files:
                    self.close()
                    raise
                self.stream.bad_files += 1
                warnings.warn(f"skipping a bad file: {e}", stacklevel=2)
                continue
            if self.eager:
                self._refill()
            return index, item

    def close(self) -> None:
        """Stop reading ahead now and wait for the threads to end."""
        self._closer()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reader:
    """Iteration over a FileStream: each iterator registered, `finalize()` stops them all."""

    def __init__(self, files: FileStream):
        self.files = files
        self._active: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()

    def _iterate(self) -> Generator[Any, None, None]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        gen = self._iterate()
        self._active.add(gen)
        return gen

    @property
    def hooks(self) -> list[str] | None:
        return self.files.hooks

    @property
    def seed(self) -> int:
        return self.files.seed

    @property
    def rank(self) -> int:
        return self.files.rank

    @property
    def world_size(self) -> int:
        return self.files.world_size

    @property
    def shapes(self) -> list[StatesShape | None]:
        """Per hook, `states`' shape and dtype (None until the first file of legacy `.pt` runs)."""
        return self.files.shapes

    @property
    def bad_files(self) -> int:
        """Files skipped as unreadable (with `skip_bad_files=True`)."""
        return self.files.bad_files

    def sync(self) -> int:
        """Pick up files written since the last listing (appended after the known ones); returns how many."""
        return self.files.sync()

    def finalize(self) -> None:
        """Stop background reading now (also done on leaving `with`)."""
        for gen in list(self._active):
            gen.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()
