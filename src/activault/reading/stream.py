"""The streaming layer under RCache and TokenLoader: which files, in which order, read how.

`FileStream` lists the megabatch files of one or more sources (listing.py: present in every
hook), orders them per epoch, seed and rank (order.py), and reads them (fetch.py): each file's
header checked before its bytes are used (a file bigger than its hook's metadata allows: before any
tensor byte is requested), its body by parallel ranged reads into a recycled buffer, decoded in
place (`megabatch.decode`: the tensors are views of that buffer). `prefetch()` reads ahead
(prefetch.py); `Reader` is the base of both readers.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError
from activault.reading.fetch import FirstByte, ObjectReader, ReadBuffers
from activault.reading.listing import Catalog, FileRef, Prefix, StatesShape
from activault.reading.options import ReadOptions
from activault.reading.order import BODY, HEAD, file_order, next_file_starts, request_priority
from activault.reading.prefetch import Prefetch
from activault.reading.workers import Stopped, Workers
from activault.storage import Store
from activault.storage.base import REREADS, ObjectChanged
from activault.vault import megabatch as fmt

# What a reader reads from: a local folder or URI (`s3://bucket/run/hook`), or a Store.
Source = str | Path | Store

__all__ = [
    "Catalog",
    "FileRef",
    "FileStream",
    "LoadedFile",
    "Prefetch",
    "Prefix",
    "Reader",
    "Source",
    "StatesShape",
]


@dataclass
class LoadedFile:
    """One megabatch file read from every hook folder: each hook's states for the same tokens."""

    file: FileRef
    states: list[torch.Tensor]  # per hook: [rows, seq, d]
    input_ids: torch.Tensor  # [rows, seq] (int32 as stored)
    positions: torch.Tensor  # [rows, seq] int32, -1 = padding
    documents: torch.Tensor | None = None  # [rows, seq] int64, -1 = padding; None: format 3 and older
    norms: list[torch.Tensor | None] = field(default_factory=list)  # per hook: [rows, seq] float32; None: format <= 4


Transform = Callable[[FileRef, int, LoadedFile], LoadedFile]  # (file, epoch, item) -> item


def _weak(transform: Transform) -> tuple[Transform, weakref.WeakMethod[Any] | None]:
    """`transform` holding its reader weakly where it is the reader's method (or a partial of one),
    and that weak method: reader -> stream -> reader would be a cycle, so a dropped reader's stream,
    and the warm buffers it hands to the next stream (buffers.SPARE_BYTES), would wait for the
    cyclic garbage collector. A `Prefetch` holds the reader while it reads."""
    bound, args, kwargs = transform, (), {}
    if isinstance(transform, partial):
        bound, args, kwargs = transform.func, transform.args, transform.keywords
    if not inspect.ismethod(bound):
        return transform, None
    ref = weakref.WeakMethod(bound)

    def call(f: FileRef, epoch: int, item: LoadedFile) -> LoadedFile:
        method = ref()
        if method is None:  # the reader is gone, and no Prefetch holds it: nobody takes this file
            raise Stopped
        return method(*args, f, epoch, item, **kwargs)

    return call, ref


class FileStream:
    """Megabatch files of one or more sources, listed, ordered and read (RCache and TokenLoader).

    Args: `uri`, `hooks` as RCache; `options`: how they are read (ReadOptions; its fields are
        attributes here too; preserve_file_order None: the stored order);
        `pin`: read into pinned memory (for CUDA); `transform`: applied to each megabatch on the
        reading thread; `held`: files the consumer holds at once (their buffers are kept for reuse;
        more than one: a gathering reader, whose mapped files on disk the kernel reads ahead: fetch.RESIDENT).
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        options: ReadOptions | None = None,
        *,
        hooks: Sequence[str] | None = None,
        pin: bool = False,
        held: int = 1,
        transform: Transform | None = None,
    ):
        o = self.options = (options if options is not None else ReadOptions()).ordered(True)
        self.catalog = Catalog(uri, hooks=hooks, options=o)
        self.hooks = self.catalog.hooks
        self.buffer_size, self.preserve_file_order = o.buffer_size, bool(o.preserve_file_order)
        self.seed, self.rank, self.world_size = o.seed, o.rank, o.world_size
        self.skip_bad_files, self.range_size, self.verify_checksums = o.skip_bad_files, o.range_size, o.verify_checksums
        self.unreadable = 0  # files skipped while reading (skip_bad_files)
        self.pin, self.held = pin, held
        self.transform: Transform | None = None
        self._owner: weakref.WeakMethod[Any] | None = None
        if transform is not None:
            self.transform, self._owner = _weak(transform)
        self.buffers = ReadBuffers(pin, keep=o.buffer_size + held + 1, recycle=o.recycle)
        self.first_byte = FirstByte()  # the storage's, as this stream's reads measure it (range plan)
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
            shuffle = not self.preserve_file_order
            order = file_order(
                self.catalog.blocks, epoch, seed=self.seed, shuffle=shuffle, rank=self.rank, world_size=self.world_size
            )
            self._order_cache = (key, order)
        return self._order_cache[1]

    def prefetch(self, epoch: int, start: int = 0, eager: bool = False) -> Prefetch[LoadedFile]:
        """The files of `epoch` from index `start` on, read ahead (see Prefetch)."""
        owner = self.owner()  # the reader, kept while its files are read (its method is `transform`)
        if owner is None and self._owner is not None:
            raise ConfigError(
                "the reader of these files was dropped: keep a reference to the RCache or TokenLoader "
                "while its files are read (`loader = TokenLoader(...)`, then `loader.files.prefetch(...)`)"
            )
        return Prefetch(self, epoch, start, eager, keep=owner)

    def owner(self) -> Any:
        """The reader whose method `transform` is (None: none, or it is gone)."""
        method = self._owner() if self._owner is not None else None
        return method.__self__ if method is not None else None

    # -- one file ----------------------------------------------------------------------------------

    def load(
        self,
        f: FileRef,
        epoch: int,
        seq: int,
        ranges: Workers,
        stop: threading.Event,
        turn: tuple[threading.Event | None, threading.Event] | None = None,
    ) -> LoadedFile:
        """Every hook's file `f.name` of source `f.source`, decoded and checked against the others.

        Every hook's header is read and checked before any body is used; then all bodies are
        read at once (ranges of this file before those of later files). A file that one request
        covers, or no bigger than its hook's metadata allows, is requested whole with its header
        (fetch.py); a bigger one's body only once its header is valid. `turn`: (the previous
        file's first requests are queued, this file's are; when it is set: order.next_file_starts).
        Mapped files (every hook's, `ObjectReader.open`) are read in place on this thread.
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
    ) -> LoadedFile:
        for attempt in range(1, REREADS + 1):
            readers = self._readers(f, stop)
            try:
                heads = self._heads(readers, seq, ranges, queued, alone)
                bodies = [
                    r.body(head, self.buffers, ranges, request_priority(BODY, seq, h))
                    for h, (r, (head, _)) in enumerate(zip(readers, heads, strict=True))
                ]
                item = self._decode(f, readers, [header for _, header in heads], bodies, queued.set)
                break
            except ObjectChanged:  # a file replaced between its header and its body (S3): read it again
                for r in readers:
                    r.abandon()
                if attempt == REREADS:
                    raise
        return self.transform(f, epoch, item) if self.transform is not None else item

    def _readers(self, f: FileRef, stop: threading.Event) -> list[ObjectReader]:
        prefix = self.catalog.prefixes[f.source]
        return [
            ObjectReader(
                prefix.store,
                prefix.key(h, f.name),
                size,
                stop=stop,
                range_size=self.range_size,
                expect=self.catalog.tensor_bytes(f.source, h),
                first_byte=self.first_byte,
                read_cold=self.held > 1,
            )
            for h, size in enumerate(f.sizes)
        ]

    def _heads(
        self, readers: list[ObjectReader], seq: int, ranges: Workers, queued: threading.Event, alone: bool
    ) -> list[tuple[memoryview, fmt.Header | None]]:
        """Every hook's first bytes and checked header; `queued` is set when the next file may start
        (order.next_file_starts).

        Mapped files: every hook's header read here, then its body. Otherwise the hooks' headers
        (or whole small files, or files of the expected size) are requested in parallel, ahead of
        any body range (`request_priority`), so a later file's ranges are queued while this
        file's still run instead of after them.
        """
        waiting, lock = [len(readers)], threading.Lock()
        asked: list[Future[tuple[memoryview, fmt.Header | None]]] = []
        try:
            mapped = all(r.open(self.buffers) for r in readers)  # mapped: read in place on this thread
            # A local file of one request is read alone first all the same: its pread takes the
            # cores a second file's would share (first batch 2x later), no connection sits idle.
            one_each = all(r.size <= r.step and not r.local for r in readers)
            when = next_file_starts(alone, mapped, one_each)
            if mapped:
                if when == "now":
                    queued.set()
                heads = [r.head(self.buffers) for r in readers]
            else:
                ranges.grow(max(r.workers for r in readers))  # threads start as ranges are queued

                def started() -> None:  # one more hook's first requests are queued
                    with lock:
                        waiting[0] -= 1
                        if not waiting[0] and when == "queued":
                            queued.set()

                asked = []
                for h, r in enumerate(readers):
                    prio = request_priority(HEAD, seq, h)
                    asked.append(ranges.submit(prio, r.head, self.buffers, ranges, prio, started))
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
        return heads

    def _decode(
        self,
        f: FileRef,
        readers: list[ObjectReader],
        headers: list[fmt.Header | None],
        bodies: list[Callable[[], torch.Tensor]],
        fetched: Callable[[], None] = lambda: None,
    ) -> LoadedFile:
        """Each hook's file decoded (`megabatch.decode`, into this stream's buffers) and checked
        against the first: the same tokens in every hook. `fetched()` is called once every byte is
        in, before the last decode: the next file's reads overlap it (a compressed file's decode
        is CPU work, as long as its fetch)."""
        states: list[torch.Tensor] = []
        norms: list[torch.Tensor | None] = []
        ids = pos = docs = None
        for h, (r, header, body) in enumerate(zip(readers, headers, bodies, strict=True)):
            data = body()
            if h == len(bodies) - 1:
                fetched()
            decoded = fmt.decode(data, r.url, header, self.verify_checksums, self.buffers.empty)
            del data  # the decoded tensors hold what they need of it
            s, i, p = self._check(decoded.tensors, r.url, h)
            d = decoded.documents
            if d is not None and d.shape != i.shape:  # parse_header checks it; a legacy file has none
                raise FormatError(f"{r.url}: 'documents' has shape {list(d.shape)}, expected {list(i.shape)}")
            if ids is None:
                ids, pos, docs = i, p, d
            elif not torch.equal(ids, i):
                raise FormatError(
                    f"{r.url}: input_ids differ from {readers[0].url}: these hooks do not hold the same tokens"
                )
            elif docs is not None and d is not None and not torch.equal(docs, d):
                raise FormatError(
                    f"{r.url}: documents differ from {readers[0].url}: these hooks do not hold the same tokens"
                )
            states.append(s)
            norms.append(decoded.norms)
        assert ids is not None and pos is not None
        return LoadedFile(f, states, ids, pos, docs, norms)

    def _expect(self, shape: StatesShape, url: str, h: int) -> None:
        with self._shape_lock:
            expected = self.catalog.shapes[h] = self.catalog.shapes[h] or shape
        if shape != expected:
            raise FormatError(self.catalog.mismatch(h, url, shape, expected))

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
        if ids.dtype != torch.int32:  # the original's .pt files: int64, as its tokenizer gave them
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise FormatError(f"{url}: 'input_ids' are {dtypes.name(ids.dtype)}, not token ids")
            ids = ids.to(torch.int32)
        pos = tensors.get("positions")
        if pos is None:  # legacy files: position within the row
            pos = torch.arange(states.shape[1], dtype=torch.int32).expand(states.shape[0], -1)
        elif pos.shape != states.shape[:2]:
            raise FormatError(f"{url}: 'positions' has shape {list(pos.shape)}, expected {list(states.shape[:2])}")
        return states, ids, pos


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
