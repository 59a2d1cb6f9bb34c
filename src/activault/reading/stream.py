"""The streaming layer under RCache and TokenLoader: which files, in which order, read how.

`FileStream` lists the megabatch files of one or more sources (listing.py: present in every
hook), orders them per epoch, seed and rank, and reads them (fetch.py): each file's header checked
before its bytes are used (a file bigger than its hook's metadata allows: before any tensor byte is
requested), its body by parallel ranged reads into a recycled buffer, decoded in place (the
tensors are views of that buffer). `Prefetch` is the bounded read-ahead; its threads stop on
`close()`, when it is dropped, and at interpreter exit.
"""

from __future__ import annotations

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

import torch

from activault.errors import ConfigError, FormatError, StorageError
from activault.reading.fetch import (
    RANGE_WORKERS,
    BufferPool,
    ObjectReader,
    Stopped,
    Workers,
    tensors_of,
)
from activault.reading.listing import Catalog, FileRef, Prefix, StatesShape
from activault.storage import Store
from activault.vault import megabatch as fmt

Source = str | Path | Store
HEAD, BODY = 0, 1  # priority classes of the range workers' jobs

__all__ = [
    "BufferPool",
    "Catalog",
    "FileRef",
    "FileStream",
    "Megabatch",
    "Prefetch",
    "Prefix",
    "Reader",
    "Source",
    "StatesShape",
    "check_device",
    "mix_seed",
]


@dataclass
class Megabatch:
    """One file's tensors, every hook's states for the same tokens."""

    states: list[torch.Tensor]  # per hook: [rows, seq, d]
    input_ids: torch.Tensor  # [rows, seq] (int32 as stored)
    positions: torch.Tensor  # [rows, seq] int32, -1 = padding


def check_device(device: str | torch.device) -> torch.device:
    """The device to deliver tensors on; a CUDA device on a machine without one is refused now."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but this machine has no usable CUDA device; use device='cpu'")
    return dev


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (Python's hash() of a str is salted per process)."""
    text = ":".join(map(str, parts)).encode()
    return zlib.crc32(text) | (zlib.adler32(repr(parts).encode()) << 32)


def _close(stop: threading.Event, pools: list[Workers]) -> None:
    stop.set()
    for p in pools:
        p.close()


class FileStream:
    """Megabatch files of one or more sources, listed, ordered and read (RCache and TokenLoader).

    Args: as RCache (`uri`, `hooks`, `buffer_size`, `preserve_file_order`, `seed`, `rank`,
        `world_size`, `skip_bad_files`, `store_options`, `range_size`);
        `pin`: read into pinned memory (for CUDA); `transform`: applied to each megabatch on the
        reading thread; `held`: files the consumer holds at once (their buffers are kept for reuse).
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
        verify_checksums: bool = False,
        transform: Callable[[FileRef, int, Megabatch], Megabatch] | None = None,  # (file, epoch, item)
    ):
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        if range_size is not None and (not isinstance(range_size, int) or range_size < 1):
            raise ConfigError(
                f"range_size must be a positive number of bytes (or None: the default), got {range_size!r}"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.catalog = Catalog(uri, hooks=hooks, store_options=store_options, skip_bad_files=skip_bad_files)
        self.hooks = self.catalog.hooks
        self.buffer_size = buffer_size
        self.preserve_file_order = preserve_file_order
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.skip_bad_files = skip_bad_files
        self.unreadable = 0  # files skipped while reading (skip_bad_files)
        self.range_size = range_size
        self.pin = pin
        self.verify_checksums = verify_checksums  # each file's bytes against its header's checksums
        self.transform = transform
        self.buffers = BufferPool(pin, keep=buffer_size + held + 1)
        self._shape_lock = threading.Lock()
        self._order_cache: tuple[tuple[int, int], list[FileRef]] | None = None

    @property
    def bad_files(self) -> int:
        """Files skipped (skip_bad_files): unreadable ones, and those missing from some hooks."""
        return self.unreadable + len(self.catalog.incomplete)

    @property
    def shapes(self) -> list[StatesShape | None]:
        """Per hook, the shape every file's states must have (None until known: legacy files)."""
        return self.catalog.shapes

    def sync(self) -> int:
        """Pick up files written since the last listing (appended after the others); how many."""
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
        self,
        f: FileRef,
        epoch: int,
        seq: int,
        ranges: Workers,
        stop: threading.Event,
        turn: tuple[threading.Event | None, threading.Event] | None = None,
    ) -> Megabatch:
        """Every hook's file `f.name` of source `f.source`, decoded and checked against the others.

        Every hook's header is read and checked before any body is used; then all bodies are
        read at once (ranges of this file before those of later files). A file that one request
        covers, or no bigger than its hook's metadata allows, is requested whole with its header
        (fetch.py); a bigger one's body only once its header is valid. `turn`: (the previous
        file's first requests are queued, this file's are): files start in order, so a later
        file's first request never runs ahead of an earlier file's ranges. The stream's first
        file (no `before`) is read alone, the next one starting once it is read, unless it is one
        request per hook. Mapped files (every hook's, `ObjectReader.open`) are read in place on
        this thread, without requests.
        """
        before, queued = turn if turn is not None else (None, threading.Event())
        try:
            while before is not None and not before.wait(0.1):
                if stop.is_set():
                    raise Stopped
            return self._load(f, epoch, seq, ranges, stop, queued, alone=before is None)
        finally:
            queued.set()  # also when this file failed: the next one goes on

    def _load(
        self,
        f: FileRef,
        epoch: int,
        seq: int,
        ranges: Workers,
        stop: threading.Event,
        queued: threading.Event,
        alone: bool = False,
    ) -> Megabatch:
        prefix = self.catalog.prefixes[f.source]
        readers = [
            ObjectReader(
                prefix.store,
                prefix.key(h, f.name),
                size,
                stop=stop,
                range_size=self.range_size,
                expect=self.catalog.tensor_bytes(f.source, h),
            )
            for h, size in enumerate(f.sizes)
        ]
        # Mapped files: every hook's header read here, then its body. Otherwise the hooks' headers
        # (or whole small files, or files of the expected size) are requested in parallel, ahead of
        # any body range: heads go before every body range (HEAD first in the priority), so a later
        # file's ranges are queued while this file's still run instead of after them.
        waiting, lock = [len(readers)], threading.Lock()
        # A first file requested in one request per hook is not read alone: it leaves the other
        # range workers idle, and where each connection has its own limit (real endpoints;
        # bench/read.py's pacing proxy) reading it alone only delays the next file by a whole file.
        # One GET per file through the proxy: 0.88 x raw alone against 0.99 beside the next, first
        # item the same (6 interleaved runs); on moto, whose Python server shares this machine's
        # cores, the first item came later (0.61 x one file against 0.33), the whole run the same.
        requested_alone = alone and any(r.size > r.step for r in readers)

        def started() -> None:  # one more hook's first requests are queued
            with lock:
                waiting[0] -= 1
                if not waiting[0] and not requested_alone:
                    queued.set()

        asked: list[Future[tuple[memoryview, fmt.Header | None]]] = []
        try:
            if all(r.open(self.buffers) for r in readers):  # mapped: read in place on this thread
                if not alone:  # the next file reads beside this one
                    queued.set()
                heads = [r.head(self.buffers) for r in readers]
            else:
                asked = [
                    ranges.submit((HEAD, seq, h), r.head, self.buffers, ranges, (HEAD, seq, h), started)
                    for h, r in enumerate(readers)
                ]
                heads = [a.result() for a in asked]
            for h, (r, (_, header)) in enumerate(zip(readers, heads, strict=True)):
                if header is not None:
                    self._expect(StatesShape(header.seq_len, header.d_model, header.dtype), r.url, h)
        except BaseException:
            for a in asked:
                a.cancel()
            for r in readers:
                r.abandon()
            raise
        bodies = [
            r.body(head, self.buffers, ranges, (BODY, seq, h))
            for h, (r, (head, _)) in enumerate(zip(readers, heads, strict=True))
        ]
        headers = [header for _, header in heads]
        states: list[torch.Tensor] = []
        ids = pos = None
        for h, (r, header, body) in enumerate(zip(readers, headers, bodies, strict=True)):
            buf = body()
            if header is None:
                tensors = fmt.decode_legacy(buf.numpy().data, r.url).tensors
            else:
                tensors = tensors_of(buf, header, r.url, self.buffers, self.verify_checksums)
            s, i, p = self._check(tensors, r.url, h)
            if ids is None:
                ids, pos = i, p
            elif not torch.equal(ids, i):
                raise FormatError(
                    f"{r.url}: input_ids differ from {readers[0].url}: these hooks do not hold the same tokens"
                )
            states.append(s)
        assert ids is not None and pos is not None
        item = Megabatch(states, ids, pos)
        return self.transform(f, epoch, item) if self.transform is not None else item

    def _expect(self, shape: StatesShape, url: str, h: int) -> None:
        with self._shape_lock:
            expected = self.catalog.shapes[h] = self.catalog.shapes[h] or shape
        if shape != expected:
            raise FormatError(f"{url}: states are {shape}, the other files {expected}: it does not belong here")

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
            raise FormatError(f"{url}: 'positions' has shape {list(pos.shape)}, expected {list(states.shape[:2])}")
        return states, ids, pos


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
        self._queued: threading.Event | None = None  # set once the last file started has its requests queued
        self._stop = threading.Event()
        self._files = Workers(stream.buffer_size, "activault-read")
        self._ranges = Workers(RANGE_WORKERS, "activault-range")
        self._closer = weakref.finalize(self, _close, self._stop, [self._files, self._ranges])

    def _refill(self) -> None:
        # Files start together, the first with the next ones, and take turns to queue their first
        # requests (`turn`), so a later file's first range, which can be a whole range of its
        # bytes, queues behind an earlier file's ranges instead of running beside them. The first
        # file is read alone, so the first item waits for one file, not for a share of two: a cold
        # disk served it in 43 ms against 79 beside the second (mapped), moto in 0.67-0.74 s
        # against 0.82-1.01 (5 interleaved runs each). After it, two files read at once moved more
        # from disk for TokenLoader (1.63 GB/s against 1.48 one at a time). A first file of one
        # request per hook reads beside the next (FileStream._load says why).
        order = self.stream.order(self.epoch)  # re-read: sync() may have appended files
        while len(self._pending) < self.stream.buffer_size and self._next < len(order):
            i = self._next
            turn = (self._queued, threading.Event())
            self._queued = turn[1]
            fut = self._files.submit((i,), self.stream.load, order[i], self.epoch, i, self._ranges, self._stop, turn)
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
                self.stream.unreadable += 1
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
        """Files skipped with `skip_bad_files=True`: unreadable, or missing from some hooks."""
        return self.files.bad_files

    @property
    def incomplete_files(self) -> dict[str, list[str]]:
        """Files skipped because some hooks lack them: url -> those hooks."""
        return dict(self.files.catalog.incomplete)

    @property
    def foreign_objects(self) -> dict[str, str]:
        """Objects in the hook folders that are not megabatch files (skipped): url -> why."""
        return dict(self.files.catalog.foreign)

    def sync(self) -> int:
        """Pick up files written since the last listing (appended after the others); how many."""
        return self.files.sync()

    def finalize(self) -> None:
        """Stop background reading now (also done on leaving `with`)."""
        for gen in list(self._active):
            gen.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()
