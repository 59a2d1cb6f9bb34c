"""The two passes of `activault shuffle` (tools/shuffle.py): the plan of buckets and pieces from the
seed, pass 1 (scatter each source file's slots into pieces by bucket) and pass 2 (gather each
bucket, permuted, into the new run's files).

Speed (docs/benchmarks.md, "Issue 31"): the buffers a pass fills are allocated once and reused (a
fresh 4 MiB tensor costs a page fault per page, more than the gather into it); pass 2 reads the
pieces ahead on a thread; the temporary run is written without fsync (tools/shuffle.py `scratch`)
and its pieces written by this process are not verified again (a resumed shuffle's are), nor
given norms (DST's encoder computes them). The source is always read with its checksums verified.
A one-bucket shuffle of a local run maps the source's files and gathers from them (`Segments`):
no copy into a run-sized buffer, whose fresh pages cost more than the gather here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from activault import dtypes
from activault.background import prefetch
from activault.errors import FormatError
from activault.reading.order import mix_seed
from activault.reading.window import permutation
from activault.storage import Store
from activault.storage.base import join, populate
from activault.storage.lock import MachineLock
from activault.tools.shuffle_plan import labels, piece_index
from activault.vault.megabatch import decode, fetch_header
from activault.vault.records import HookMetadata, RunRecord, file_name
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter

PIECES, PADDING = 0, 1  # the temporary run's two "machines": bucket pieces, and padding apart
AHEAD = 2  # pass 2's pieces read ahead of the one being copied into its bucket


@dataclass
class Meter:
    """Token slots held in memory at once, counted where they are allocated and let go."""

    held: int = 0
    peak: int = 0

    def hold(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def drop(self, n: int) -> None:
        self.held -= n


@dataclass
class SourceRun:
    """The source: its records, files (name order), each file's token slots and machine, and
    whether every file carries provenance (`documents`)."""

    store: Store
    run: str
    record: RunRecord
    metadata: dict[str, HookMetadata]
    names: list[str]
    slots: list[int]
    machines: list[int]
    provenance: bool
    stats: dict[str, RunningStats] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # key -> listed size: one request per read

    @property
    def seq(self) -> int:
        return next(iter(self.metadata.values())).seq_length

    @property
    def token_bytes(self) -> int:
        per = 16 if self.provenance else 8  # ids and positions int32, documents int64
        return per + sum(m.d_model * dtypes.to_torch(m.dtype).itemsize for m in self.metadata.values())


def piece_slots(counts: np.ndarray) -> int:
    """Pass 2's pieces held at once at most: the one copied, `AHEAD` queued, the one being read
    (bucket 0 has none)."""
    return (AHEAD + 2) * int(counts[:, 1:].max(initial=0))


def global_documents(docs: torch.Tensor, machine: int, machines: int) -> torch.Tensor:
    """A source machine's document ordinals as a shuffled run stores them: `ordinal * machines +
    machine` (one stream over every source machine), padding -1 kept."""
    return torch.where(docs >= 0, docs * machines + machine, docs)


def _rows(t: torch.Tensor) -> np.ndarray:
    """A contiguous [n, ...] tensor's memory as n opaque numpy rows: gathers and copies are then one
    memcpy per row on this thread (torch's thread pool costs ~50x on a loaded 2-core machine)."""
    raw = t.reshape(t.shape[0], -1).view(torch.uint8).numpy()
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(t.shape[0])


# ---- token slots --------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Token slots of every hook, flat: states per hook [n, d], ids and positions [n] int32,
    documents [n] int64 (None: the source has no provenance)."""

    states: dict[str, torch.Tensor]
    ids: torch.Tensor
    pos: torch.Tensor
    docs: torch.Tensor | None

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    @staticmethod
    def empty(like: Tokens, n: int) -> Tokens:
        """Buffers for `n` slots shaped like `like`'s (allocated once, then reused)."""
        return Tokens(
            {h: torch.empty((n, s.shape[1]), dtype=s.dtype) for h, s in like.states.items()},
            torch.empty(n, dtype=torch.int32),
            torch.empty(n, dtype=torch.int32),
            None if like.docs is None else torch.empty(n, dtype=torch.int64),
        )

    def view(self, a: int, b: int) -> Tokens:
        docs = None if self.docs is None else self.docs[a:b]
        return Tokens({h: s[a:b] for h, s in self.states.items()}, self.ids[a:b], self.pos[a:b], docs)

    def columns(self) -> list[torch.Tensor]:
        return [*self.states.values(), self.ids, self.pos] + ([self.docs] if self.docs is not None else [])

    def gather(self, index: np.ndarray, out: Tokens) -> Tokens:
        """self[index] into the first len(index) slots of `out` (no allocation); returns that view."""
        dest = out.view(0, index.size)
        for s, d in zip(self.columns(), dest.columns(), strict=True):
            np.take(_rows(s), index, out=_rows(d))
        return dest

    def put(self, at: int, other: Tokens) -> None:
        """Copy `other` into slots at..at+other.n."""
        for s, d in zip(other.columns(), self.view(at, at + other.n).columns(), strict=True):
            _rows(d)[...] = _rows(s)

    def write(self, out: RunWriter, seq: int, data_state: dict[str, int]) -> Future[None]:
        """These slots as the writer's next file ([rows, seq, d] and [rows, seq])."""
        r = self.n // seq
        states = {h: s.reshape(r, seq, -1) for h, s in self.states.items()}
        docs = None if self.docs is None else self.docs.reshape(r, seq)
        real = int((self.pos >= 0).sum())
        return out.write_file(
            states,
            self.ids.reshape(r, seq),
            self.pos.reshape(r, seq),
            tokens=real,
            data_state=data_state,
            stats={},
            documents=docs,
        )


class Segments(Tokens):
    """Several Tokens read as one (a one-bucket shuffle's mapped source files): ids, positions and
    documents concatenated (16 bytes a slot at most), states left where they are; `states` holds the first
    part's (their shapes and dtypes). Only `gather` reads the parts' states."""

    def __init__(self, parts: list[Tokens]):
        cat = lambda cols: torch.cat(cols) if len(cols) > 1 else cols[0].clone()  # noqa: E731
        docs = None if parts[0].docs is None else cat([p.docs for p in parts if p.docs is not None])
        super().__init__(parts[0].states, cat([p.ids for p in parts]), cat([p.pos for p in parts]), docs)
        self.starts = np.cumsum([0] + [p.n for p in parts])  # [parts + 1] slot offsets
        self.rows = {h: [_rows(p.states[h]) for p in parts] for h in self.states}
        self.scratch: dict[str, np.ndarray] = {}  # hook -> reused rows, in the parts' order

    def view(self, a: int, b: int) -> Tokens:
        if (a, b) != (0, self.n):
            raise ValueError("a view of Segments is the whole of it")
        return self

    def gather(self, index: np.ndarray, out: Tokens) -> Tokens:
        """self[index] into the first len(index) slots of `out`: each part's rows in storage order
        into a scratch buffer (sequential reads of the mapped files), then put in place from it."""
        dest = out.view(0, index.size)
        small = [self.ids, self.pos] + ([self.docs] if self.docs is not None else [])
        for s, d in zip(small, dest.columns()[len(self.states) :], strict=True):
            np.take(_rows(s), index, out=_rows(d))
        order = np.argsort(index, kind="stable")
        where = np.empty_like(order)
        where[order] = np.arange(order.size)  # index[i] is at scratch row where[i]
        ranked = index[order]
        cuts = np.searchsorted(ranked, self.starts)
        for h, parts in self.rows.items():
            scratch = self.scratch.get(h)
            if scratch is None or scratch.size < index.size:
                scratch = self.scratch[h] = np.empty(index.size, dtype=parts[0].dtype)
            scratch = scratch[: index.size]
            for k, rows in enumerate(parts):
                a, b = int(cuts[k]), int(cuts[k + 1])
                if a < b:
                    np.take(rows, ranked[a:b] - self.starts[k], out=scratch[a:b])
            np.take(scratch, where, out=_rows(dest.states[h]))
        return dest


class Buffers:
    """Byte buffers a pass reads whole files into, `sets` of one per hook in turn, allocated once
    (a fresh buffer per file costs a page fault per page): set k is read again only once the set
    read `sets` files before it is no longer used."""

    def __init__(self, sets: int):
        self.sets: list[dict[str, bytearray]] = [{} for _ in range(sets)]
        self.turn = 0

    def next(self) -> dict[str, bytearray]:
        self.turn = (self.turn + 1) % len(self.sets)
        return self.sets[self.turn]


def _get(
    store: Store, key: str, size: int | None, into: dict[str, bytearray] | None, hook: str, mapped: bool = False
) -> memoryview:
    """The object's bytes, into `into[hook]` when its listed size is known (one request; a file
    replaced since it was listed is read whole as it is now, or is ObjectChanged on S3); `mapped`:
    mapped where the store can (no buffer: a local file in the page cache is not copied)."""
    if mapped:
        with store.open(key, size) as obj:
            mapping = obj.map()
        if mapping is None:  # not mapped after all (e.g. out of descriptors): a buffer of its own
            return store.get(key)
        populate(mapping, 0, len(mapping))  # an error now, not a SIGBUS later, if it shrank
        return memoryview(mapping)
    if into is None or size is None:
        return store.get(key)
    with store.open(key, size) as obj:
        if len(into.get(hook, b"")) < obj.size:
            into[hook] = bytearray(obj.size)
        view = memoryview(into[hook])[: obj.size]
        return view[: obj.read_into(0, view)]


def read_file(
    store: Store,
    run: str,
    hooks: list[str],
    name: str,
    provenance: bool,
    verify: bool = True,
    sizes: dict[str, int] | None = None,
    into: Buffers | None = None,
    mapped: bool = False,
) -> Tokens:
    """One file of every hook (checksums verified unless `verify` is False: a piece this process
    wrote); ids, positions and documents must agree across hooks. Given the files' listed `sizes`,
    read into the next set of `into`, or `mapped` (the result's tensors are views of them)."""
    states, first = {}, None
    bufs = into.next() if into is not None else None
    for h in hooks:
        key = join(run, h, name)
        url = store.url(key)
        mb = decode(_get(store, key, (sizes or {}).get(key), bufs, h, mapped), url, verify_checksums=verify)
        if mb.positions is None:
            raise FormatError(f"{url} has no positions (a legacy file): not shuffled; nothing written")
        docs = mb.documents.reshape(-1) if mb.documents is not None else None
        if provenance and docs is None:
            raise FormatError(f"{url} has no documents, other files of the run have: it changed; not shuffled")
        mine = Tokens({}, mb.input_ids.reshape(-1), mb.positions.reshape(-1), docs if provenance else None)
        if first is None:
            first = mine
        elif not (
            torch.equal(first.ids, mine.ids)
            and torch.equal(first.pos, mine.pos)
            and (first.docs is None or mine.docs is None or torch.equal(first.docs, mine.docs))
        ):
            raise FormatError(f"{url}: its tokens differ from hook {hooks[0]!r}'s file of the same name; not shuffled")
        states[h] = mb.states.reshape(mine.n, -1)
    assert first is not None
    return Tokens(states, first.ids, first.pos, first.docs)


# ---- pass 1: scatter ----------------------------------------------------------------------------------


def _mappable(src: SourceRun) -> bool:
    """Whether the source's files can all be mapped: a local store, and each mapping holds a
    descriptor, so at most half of the process's limit on them (`ulimit -n`, often 1024)."""
    import resource

    if len(src.names) * len(src.record.hooks) > resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2:
        return False
    mapping = src.store.map(join(src.run, src.record.hooks[0], src.names[0]))
    if mapping is None:
        return False
    mapping.close()
    return True


def _read_source(src: SourceRun, j: int, into: Buffers, mapped: bool = False) -> Tokens:
    """Source file j, verified, its documents as the shuffled run stores them."""
    hooks, name = src.record.hooks, src.names[j]
    tokens = read_file(src.store, src.run, hooks, name, src.provenance, True, src.sizes, into, mapped)
    if tokens.n != src.slots[j]:
        raise FormatError(f"{src.store.url(src.run)}: {src.names[j]} changed while it was shuffled")
    if tokens.docs is not None:
        tokens.docs = global_documents(tokens.docs, src.machines[j], src.record.num_runs)
    return tokens


def scatter(
    src: SourceRun,
    store: Store,
    temp: tuple[RunRecord, dict[str, HookMetadata]],
    counts: np.ndarray,
    seed: int,
    meter: Meter,
    claim: MachineLock,
    keep: bool,
) -> tuple[int, Tokens | None]:
    """Pass 1: every source file's slots as pieces by bucket, and its padding apart, resumed from
    the temporary run's progress records; with `keep`, bucket 0 gathered in memory (a buffer big
    enough for any bucket, pass 2's), or for one bucket on a store that maps files, the mapped
    files themselves (`Segments`: no copy, no fresh memory). Returns the first piece this process
    wrote (the pieces before it, if any, were written by a killed shuffle) and bucket 0.

    Without `keep` (DST is past bucket 0) pass 1 had finished: DST is written only after it."""
    index = piece_index(counts)
    if not keep:
        return int((index >= 0).sum()), None
    record, meta = temp
    # No norms: nobody filters the pieces (9.7 ms a 4 MiB file, the largest cost of encoding them).
    pieces = RunWriter(store, record, meta, PIECES, norms=False)
    pads = RunWriter(store, record, meta, PADDING, threads=1, norms=False)
    fresh = pieces.files
    pieces.join()
    pieces.begin()
    pads.begin()
    pad_from = int((pads.resumed.data_state or {}).get("source_file", 0))
    reader = ThreadPoolExecutor(1, thread_name_prefix="activault-shuffle-read")
    inflight: deque[tuple[Future[None] | None, Tokens]] = deque()
    most, into = max(src.slots), Buffers(2)  # the file scattered and the next one being read
    free: list[Tokens] = []  # grouped buffers (2): this file's pieces, the previous file's in flight
    first: Tokens | None = None
    at = 0  # bucket 0's slots gathered so far
    mapped = counts.shape[1] == 1 and _mappable(src)
    parts: list[Tokens] = []  # mapped: bucket 0's files
    try:
        ahead = reader.submit(_read_source, src, 0, into, mapped)
        meter.hold(most)
        for j in range(len(src.names)):
            claim.check()
            tokens = ahead.result()
            if j + 1 < len(src.names):  # the next file read while this one is scattered
                ahead = reader.submit(_read_source, src, j + 1, into, mapped)
                meter.hold(most)
            c0 = int(counts[j, 0])
            if mapped:
                order = np.arange(c0)  # one bucket: every slot, in file order
                parts.append(tokens)
                meter.drop(most - tokens.n)  # held as bucket 0: its own slots
            else:
                if first is None:
                    first = Tokens.empty(tokens, int(counts.sum(0).max()))
                    meter.hold(first.n)
                order = np.argsort(labels(counts[j], j, seed), kind="stable")
                tokens.gather(order[:c0], first.view(at, at + c0))
            at += c0
            pad = np.flatnonzero(tokens.pos.numpy() < 0)
            if pad.size and j >= pad_from:
                apart = tokens.gather(pad, Tokens.empty(tokens, pad.size))
                meter.hold(apart.n)
                apart.write(pads, 1, {"source_file": j + 1})
                pads.flush()  # counted before the pieces that follow it: pass 1's end says both are done
                meter.drop(apart.n)
            todo = [int(b) for b in np.flatnonzero(index[j] >= pieces.files)]  # not written before a kill
            if not todo:
                del tokens
                meter.drop(0 if mapped else most)  # a mapped file stays held, as bucket 0
                continue
            if not free:
                free.append(Tokens.empty(tokens, most))
                meter.hold(most)
            buf = free.pop()
            grouped = tokens.gather(order[c0:], buf)  # buckets 1.. in order
            del tokens
            meter.drop(most)
            ends = np.cumsum(counts[j]) - c0
            last = None
            for b in todo:
                a = int(ends[b] - counts[j, b])
                last = grouped.view(a, int(ends[b])).write(pieces, 1, {"source_file": j, "bucket": b + 1})
            inflight.append((last, buf))
            while len(inflight) > 1:  # this file's pieces and the previous file's in flight
                fut, done = inflight.popleft()
                if fut is not None:
                    fut.result()
                free.append(done)  # reused once the writes that read it are done
        pieces.flush()
        pieces.close()
        pads.close()
    except BaseException:
        pieces.abort()
        pads.abort()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        meter.drop(meter.held)
    if mapped:
        first = Segments(parts)
    assert first is not None
    meter.hold(first.n)  # bucket 0, kept for pass 2
    return fresh, first


# ---- pass 2: gather -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Pass 2's inputs: the temporary run, the counts, the padding files and which pieces are fresh."""

    temp: RunRecord
    counts: np.ndarray
    pad_files: int
    seed: int
    fresh: int  # pieces from this index on were written by this process (not verified again)
    provenance: bool
    sizes: dict[str, int]  # the temporary run's files' listed sizes


def _pieces(store: Store, plan: Plan, begin: int) -> Iterator[tuple[int, Tokens]]:
    """(bucket, piece) from bucket `begin` on, read on a thread `AHEAD` pieces ahead; the padding
    files last, as bucket `buckets`."""
    index = piece_index(plan.counts)
    buckets = plan.counts.shape[1]
    hooks, run = plan.temp.hooks, plan.temp.run_name

    # A piece is copied into its bucket before the one read AHEAD + 2 after it reuses its buffers.
    into = Buffers(AHEAD + 2)

    def produce() -> Iterator[tuple[int, Tokens]]:
        for b in range(max(begin, 1), buckets):
            for k in index[:, b][index[:, b] >= 0].tolist():
                verify = k < plan.fresh
                name = file_name(PIECES, k)
                yield b, read_file(store, run, hooks, name, plan.provenance, verify, plan.sizes, into)
        for k in range(plan.pad_files if begin <= buckets else 0):
            yield buckets, read_file(store, run, hooks, file_name(PADDING, k), plan.provenance)

    return prefetch(produce(), AHEAD)


def _streams(
    store: Store, plan: Plan, meter: Meter, begin: int, first: Tokens | None
) -> Iterator[tuple[int, Tokens, np.ndarray]]:
    """(bucket, its tokens, their order) from bucket `begin` on: each bucket's real tokens permuted,
    then the padding (bucket `buckets`) in source order. Bucket 0 is `first` (gathered by pass 1),
    whose buffer is then reused for the others."""
    sizes = plan.counts.sum(0).tolist()
    if plan.pad_files:
        head = lambda k: fetch_header(store, join(plan.temp.run_name, plan.temp.hooks[0], file_name(PADDING, k)))  # noqa: E731
        sizes.append(sum(head(k).rows for k in range(plan.pad_files)))
    pieces = _pieces(store, plan, begin)
    piece = next(pieces, None)  # started: the next buckets' pieces are read while bucket 0 is written
    buf, b, at = first, begin, 0
    if begin == 0:
        if sizes[0]:
            yield _finished(store, plan, 0, first, sizes[0], sizes[0])
        b = 1
    if piece is not None:
        meter.hold(piece_slots(plan.counts))  # the pieces in flight
    while piece is not None:
        pb, tokens = piece
        while pb > b:  # bucket b is complete
            if b < len(sizes) and sizes[b]:
                yield _finished(store, plan, b, buf, at, sizes[b])
            b, at = b + 1, 0
        if buf is None or isinstance(buf, Segments) or buf.n < max(sizes[b:]):  # mapped files: read only
            meter.drop(0 if buf is None else buf.n)
            buf = Tokens.empty(tokens, max(sizes[b:]))
            meter.hold(buf.n)
        buf.put(at, tokens)
        at += tokens.n
        piece = next(pieces, None)
    while b < len(sizes):
        if sizes[b]:
            yield _finished(store, plan, b, buf, at, sizes[b])
        b, at = b + 1, 0


def _finished(store: Store, plan: Plan, b: int, buf: Tokens | None, at: int, n: int) -> tuple[int, Tokens, np.ndarray]:
    if buf is None or at != n:
        url = store.url(plan.temp.run_name)
        raise FormatError(
            f"{url}: bucket {b}'s files hold {at} tokens, not {n}: the temporary run is damaged (e.g. the "
            f"machine stopped while it was written without fsync); remove the folder {url} (scratch, written "
            "again from SRC) and run the same command again"
        )
    tokens = buf.view(0, n)
    if b == plan.counts.shape[1]:
        return b, tokens, np.arange(n)
    real = np.flatnonzero(tokens.pos.numpy() >= 0)
    return b, tokens, real[permutation(real.size, mix_seed(plan.seed, "shuffle", "bucket", b))]


def gather(src: SourceRun, out: RunWriter, plan: Plan, meter: Meter, claim: MachineLock, first: Tokens | None) -> None:
    """Pass 2: DST's files from the buckets in order (bucket 0 is `first`, kept by pass 1), resumed
    at the cursor of its progress record."""
    seq, buckets = src.seq, plan.counts.shape[1]
    per_file = next(iter(src.metadata.values())).rows_per_file * seq
    cursor = out.resumed.data_state or {"bucket": 0, "offset": 0}
    begin, skip = int(cursor["bucket"]), int(cursor["offset"])
    free: list[Tokens] = []  # staging files (2): one filled while the other is written
    staging: Tokens | None = None
    filled = 0
    inflight: deque[tuple[Future[None], Tokens]] = deque()
    for b, tokens, order in _streams(out.store, plan, meter, begin, first):
        a, skip = skip, 0
        while a < order.size:
            claim.check()
            if staging is None:
                if not free:
                    free.append(Tokens.empty(tokens, per_file))
                    meter.hold(per_file)
                staging = free.pop()
            take = min(per_file - filled, order.size - a)
            tokens.gather(order[a : a + take], staging.view(filled, filled + take))
            a, filled = a + take, filled + take
            if filled == per_file:
                at = {"bucket": b + 1, "offset": 0} if a == order.size else {"bucket": b, "offset": a}
                inflight.append((staging.write(out, seq, at), staging))
                staging, filled = None, 0
                while len(inflight) > 1:  # this file and the one before it in flight
                    fut, done = inflight.popleft()
                    fut.result()
                    free.append(done)  # refilled only once its write is done
    if staging is not None and filled:  # the last file, short
        staging.view(0, filled).write(out, seq, {"bucket": buckets + 1, "offset": 0})
    out.flush()
    meter.drop(meter.held)
