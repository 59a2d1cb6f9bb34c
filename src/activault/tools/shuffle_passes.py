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
from activault.storage.base import join
from activault.storage.lock import MachineLock
from activault.tools.shuffle_plan import labels, piece_index
from activault.tools.shuffle_tokens import Buffers, Segments, Tokens, read_file
from activault.vault.megabatch import fetch_header
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
