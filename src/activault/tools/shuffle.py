"""`activault shuffle SRC DST`: a new run holding a uniform random permutation of a run's tokens,
in bounded memory, resumable (tools/mixing.py measures how well a reader mixes).

Two passes over storage (an external bucket shuffle). Pass 1 reads the source's files one at a
time and gives each token slot a bucket, uniformly at random and independently (seeded by the
file): the counts per bucket are a multinomial draw, so every piece's size is known from the
seed and the files' sizes alone. Each file's slots are written, grouped by bucket, as pieces of a
temporary run inside DST (`DST/.shuffle`, through the run writer: checksums, commit protocol),
and its padding (position -1) once more apart. Pass 2 loads one bucket at a time, permutes its
real tokens uniformly (seeded by the bucket) and writes them to DST's files in order, the padding
last (padding only ends a run's data). Independent uniform buckets, each permuted uniformly, make
a uniform permutation of the whole. Every hook's states move with the same permutation, and so do
token ids and positions.

Memory: pass 1 holds at most 4 source files (the one scattered, its scattered copy, the previous
copy still being written, the next one read ahead); pass 2 one bucket, one piece being read into
it and 2 output files. Buckets are sized at half of `memory` (default 4 GiB), so a run of any size
is shuffled in about `memory` (plus the files), whatever the run's size.

Resume: both passes are deterministic for a seed, and each counts what it wrote in a progress
record (pass 1: the temporary run's; pass 2: DST's, with the stream position as its cursor), so a
killed shuffle run again writes the same bytes. DST's statistics are the source's (the same
tokens), merged over the source's machines; its cfg.json is the source's with `config.shuffled_from`
(source run, seed, buckets).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.reading.order import mix_seed
from activault.reading.window import permutation
from activault.storage import Store, open_store
from activault.storage.base import LOCKS, join
from activault.storage.lock import MachineLock, hold_task
from activault.storage.uri import is_s3
from activault.vault.megabatch import decode, fetch_header
from activault.vault.records import (
    HookMetadata,
    RunRecord,
    file_name,
    hook_metadata,
    progress_key,
    read_metadata,
    read_progress,
    read_run,
)
from activault.vault.stats import RunningStats, merge_all
from activault.vault.writer import RunWriter

TEMP = ".shuffle"  # the temporary bucket run, inside DST (hidden from local listings)
MEMORY = 4 << 30  # default bound on the tokens held at once, in bytes
PROVENANCE = "shuffled_from"  # cfg.json config key: {"run", "seed", "buckets"}
PIECES, PADDING = 0, 1  # the temporary run's two "machines": bucket pieces, and padding apart


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
class ShuffleResult:
    source: str
    dest: str
    seed: int
    buckets: int
    tokens: int = 0  # token slots (padding included), the same as the source's
    files: int = 0
    peak_tokens: int = 0  # the most token slots held at once (Meter)
    bound_tokens: int = 0  # the stated bound on them
    seconds: float = 0.0
    already: bool = False  # DST was a finished shuffle of SRC already


@dataclass
class _Run:
    """The source: its records, files (name order) and each file's token slots."""

    store: Store
    run: str
    record: RunRecord
    metadata: dict[str, HookMetadata]
    names: list[str]
    slots: list[int]
    stats: dict[str, RunningStats] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return next(iter(self.metadata.values())).seq_length

    @property
    def token_bytes(self) -> int:
        return 8 + sum(m.d_model * dtypes.to_torch(m.dtype).itemsize for m in self.metadata.values())


# ---- the plan: buckets and pieces, from the seed and the files' sizes -------------------------------


def _rng(seed: int, *parts: int | str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(mix_seed(seed, "shuffle", *parts)))


def bucket_counts(slots: Sequence[int], buckets: int, seed: int) -> np.ndarray:
    """[files, buckets]: how many of each file's slots go to each bucket (a multinomial draw)."""
    p = np.full(buckets, 1.0 / buckets)
    return np.stack([_rng(seed, "file", j).multinomial(c, p) for j, c in enumerate(slots)])


def labels(count: np.ndarray, j: int, seed: int) -> np.ndarray:
    """Each slot's bucket in file j: the counts (first draw) arranged uniformly (second draw)."""
    g = _rng(seed, "file", j)
    g.multinomial(int(count.sum()), np.full(count.size, 1.0 / count.size))  # the counts' draw
    return g.permutation(np.repeat(np.arange(count.size), count))


def piece_index(counts: np.ndarray) -> np.ndarray:
    """[files, buckets]: the temporary run's file index of each non-empty piece (-1: empty)."""
    present = counts > 0
    return np.where(present, np.cumsum(present.ravel()).reshape(counts.shape) - 1, -1)


# ---- checks before anything is written ----------------------------------------------------------------


def _place(uri: str) -> tuple[Store, str]:
    """(the store holding a run folder, the run's name) of `PATH/RUN` or `s3://BUCKET[/PREFIX]/RUN`."""
    uri = str(uri).rstrip("/")
    parent, _, run = uri.rpartition("/")
    if not run or run in (".", "..") or (is_s3(uri) and parent.count("/") < 2):
        raise ConfigError(f"{uri!r} names no run folder: write PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    return open_store(parent or "."), run


def _source(store: Store, run: str) -> _Run:
    """The source's records and files, once every machine has finished; else an error naming why."""
    url = store.url(run)
    record = read_run(store, run)
    if record is None:
        raise NotFoundError(f"{url} holds no run (no cfg.json): SRC must be a run folder, PATH/RUN")
    if record.original is not None:
        raise ConfigError(f"{url} was written by the original Activault: convert it first; nothing written")
    names: list[str] = []
    parts = []
    for m in range(record.num_runs):
        rec = read_progress(store, run, m)
        if rec is None or not rec.finished:
            raise ConfigError(
                f"machine {m} of {url} has not finished collecting: shuffle once collection has "
                "ended (its collect command resumes it); nothing written"
            )
        names += [file_name(m, k) for k in range(rec.files_done)]
        parts.append({h: rec.stats[h].running() for h in record.hooks if h in rec.stats})
    metadata = {}
    for h in record.hooks:
        meta = read_metadata(store, join(run, h))
        if meta is None:
            raise NotFoundError(f"{store.url(join(run, h))} has no metadata.json; rerun one machine's collect")
        metadata[h] = meta
    if not names:
        raise ConfigError(f"{url} holds no files: nothing to shuffle")
    first = record.hooks[0]
    with ThreadPoolExecutor(8) as pool:
        headers = list(pool.map(lambda n: fetch_header(store, join(run, first, n)), names))
    src = _Run(store, run, record, metadata, names, [hd.rows * hd.seq_len for hd in headers])
    for h in record.hooks:
        merged = merge_all(p[h] for p in parts if h in p)
        if merged is None or any(h not in p for p in parts):
            raise FormatError(f"{url}: a finished progress record has no statistics of hook {h!r}; nothing written")
        src.stats[h] = merged
    return src


def _check_dest(store: Store, run: str, src_url: str, seed: int) -> RunRecord | None:
    """DST's cfg.json when it is a shuffle of SRC with this seed (resumed); None when DST is empty;
    else an error: DST is never written over."""
    url = store.url(run)
    if url.rstrip("/") == src_url.rstrip("/") or url.startswith(src_url.rstrip("/") + "/"):
        raise ConfigError(f"DST {url} is SRC or inside it: the shuffle writes a new run; name another DST")
    record = read_run(store, run)
    if record is None:
        dirs, files = store.list_dir(run)
        if [d for d in dirs if d not in (LOCKS, TEMP)] or files:
            raise ConfigError(f"DST {url} already holds other data: nothing written; name a new DST")
        return None
    prov = record.config.get(PROVENANCE)
    if not isinstance(prov, dict) or prov.get("run") != src_url:
        raise ConfigError(
            f"DST {url} already holds a run that is not a shuffle of {src_url}: nothing written; name a new DST"
        )
    if prov.get("seed") != seed:
        raise ConfigError(
            f"DST {url} is a shuffle of {src_url} with seed {prov.get('seed')}, not {seed}: rerun with "
            f"--seed {prov.get('seed')} to resume it, or name a new DST"
        )
    return record


def choose_buckets(src: _Run, memory: int) -> int:
    """Buckets of about half of `memory` each; ConfigError when `memory` cannot hold the files."""
    files = 4 * max(src.slots) * src.token_bytes
    if memory < 2 * files:
        raise ConfigError(
            f"memory={memory} bytes cannot hold the shuffle's files (4 source files: {files} bytes) and a "
            f"bucket: pass memory >= {2 * files}"
        )
    return max(1, math.ceil(sum(src.slots) * src.token_bytes / (memory // 2)))


def bound_tokens(src: _Run, counts: np.ndarray) -> int:
    """The most token slots the shuffle holds at once (see the module's docstring)."""
    piece = int(counts.max())
    out = next(iter(src.metadata.values())).rows_per_file * src.seq
    return max(4 * max(src.slots), int(counts.sum(0).max()) + piece + 2 * out)


# ---- records of the new run and of its temporary run -------------------------------------------------


def _dest_record(src: _Run, dst: str, seed: int, buckets: int) -> RunRecord:
    from activault.version import __version__

    prov = {"run": src.store.url(src.run), "seed": seed, "buckets": buckets}
    return src.record.model_copy(
        update={
            "run_name": dst,
            "num_runs": 1,
            "progress": [progress_key("", 0)],
            "activault_version": __version__,
            "config": {**src.record.config, PROVENANCE: prov},
        }
    )


def _dest_metadata(src: _Run, dst: str) -> dict[str, HookMetadata]:
    return {h: m.model_copy(update={"run_name": dst}) for h, m in src.metadata.items()}


def _temp(src: _Run, dst: str) -> tuple[RunRecord, dict[str, HookMetadata]]:
    """The temporary run of pieces: one token a row (seq 1), a piece at most a source file."""
    run, most = join(dst, TEMP), max(src.slots)
    record = RunRecord(run_name=run, hooks=src.record.hooks, num_runs=2, model=src.record.model)
    meta = {
        h: hook_metadata(
            run_name=run,
            hook=h,
            d_model=m.d_model,
            dtype=m.dtype,
            seq_length=1,
            rows_per_file=most,
            batch_size=most,
            batches_per_upload=1,
            model="activault shuffle buckets",
        )
        for h, m in src.metadata.items()
    }
    return record, meta


# ---- pass 1: scatter ----------------------------------------------------------------------------------


@dataclass
class _Tokens:
    """Token slots of every hook, flat: states per hook [n, d], ids and positions [n] int32."""

    states: dict[str, torch.Tensor]
    ids: torch.Tensor
    pos: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    def take(self, index: torch.Tensor) -> _Tokens:
        return _Tokens({h: s.index_select(0, index) for h, s in self.states.items()}, self.ids[index], self.pos[index])

    def rows(self, a: int, b: int, seq: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Slots a..b as the writer's [rows, seq, d] and [rows, seq]."""
        r = (b - a) // seq
        states = {h: s[a:b].reshape(r, seq, -1) for h, s in self.states.items()}
        return states, self.ids[a:b].reshape(r, seq), self.pos[a:b].reshape(r, seq)


def _read_file(store: Store, run: str, hooks: list[str], name: str) -> _Tokens:
    """One file of every hook, checksums verified; ids and positions must agree across hooks."""
    states, ids, pos = {}, None, None
    for h in hooks:
        url = store.url(join(run, h, name))
        mb = decode(store.get(join(run, h, name)), url, verify_checksums=True)
        if mb.positions is None:
            raise FormatError(f"{url} has no positions (a legacy file): not shuffled; nothing written")
        if ids is None:
            ids, pos = mb.input_ids.reshape(-1), mb.positions.reshape(-1)
        elif pos is None or not (
            torch.equal(ids, mb.input_ids.reshape(-1)) and torch.equal(pos, mb.positions.reshape(-1))
        ):
            raise FormatError(f"{url}: its tokens differ from hook {hooks[0]!r}'s file of the same name; not shuffled")
        states[h] = mb.states.reshape(ids.numel(), -1)
    assert ids is not None and pos is not None
    return _Tokens(states, ids, pos)


def _scatter(
    src: _Run,
    store: Store,
    temp: tuple[RunRecord, dict[str, HookMetadata]],
    counts: np.ndarray,
    seed: int,
    meter: Meter,
    claim: MachineLock,
) -> None:
    """Pass 1: every source file's slots as pieces by bucket, and its padding apart, resumed from
    the temporary run's progress records."""
    record, meta = temp
    index = piece_index(counts)
    pieces, pads = RunWriter(store, record, meta, PIECES), RunWriter(store, record, meta, PADDING, threads=1)
    if pieces.files >= int((index >= 0).sum()):
        return
    pieces.join()
    pieces.begin()
    pads.begin()
    pad_from = int((pads.resumed.data_state or {}).get("source_file", 0))
    start = int(np.argwhere(index == pieces.files)[0][0])
    reader = ThreadPoolExecutor(1, thread_name_prefix="activault-shuffle-read")
    inflight: deque[tuple[Future[None], int]] = deque()
    try:
        ahead = reader.submit(_read_file, src.store, src.run, src.record.hooks, src.names[start])
        meter.hold(src.slots[start])
        for j in range(start, len(src.names)):
            claim.check()
            tokens = ahead.result()
            if j + 1 < len(src.names):  # the next file read while this one is scattered
                ahead = reader.submit(_read_file, src.store, src.run, src.record.hooks, src.names[j + 1])
                meter.hold(src.slots[j + 1])
            if tokens.n != src.slots[j]:
                raise FormatError(f"{src.store.url(src.run)}: {src.names[j]} changed while it was shuffled")
            grouped = tokens.take(torch.from_numpy(np.argsort(labels(counts[j], j, seed), kind="stable")))
            meter.hold(grouped.n)
            pad = torch.nonzero(tokens.pos < 0).reshape(-1)
            if pad.numel() and j >= pad_from:
                apart = tokens.take(pad)
                pads.write_file(*apart.rows(0, apart.n), tokens=0, data_state={"source_file": j + 1}, stats={})
                pads.flush()  # counted before the pieces that follow it: pass 1's end says both are done
            del tokens
            meter.drop(src.slots[j])
            ends = np.cumsum(counts[j])
            last = None
            for b in np.flatnonzero(counts[j]):
                if index[j, b] < pieces.files:
                    continue  # written before the kill
                a = int(ends[b] - counts[j, b])
                states, ids, pos = grouped.rows(a, int(ends[b]))
                real = int((pos >= 0).sum())
                last = pieces.write_file(
                    states, ids, pos, tokens=real, data_state={"source_file": j, "bucket": int(b) + 1}, stats={}
                )
            if last is not None:
                inflight.append((last, grouped.n))
            else:
                meter.drop(grouped.n)
            while len(inflight) > 1:  # this file's pieces and the previous file's in flight
                fut, n = inflight.popleft()
                fut.result()
                meter.drop(n)
            del grouped
        pieces.flush()
        for _, n in inflight:
            meter.drop(n)
        pieces.close()
        pads.close()
    except BaseException:
        pieces.abort()
        pads.abort()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


# ---- pass 2: gather -----------------------------------------------------------------------------------


def _load_bucket(store: Store, temp: RunRecord, machine: int, files: Sequence[int], n: int, meter: Meter) -> _Tokens:
    """The temporary run's `files` of `machine`, one after another into one set of tensors."""
    hooks = temp.hooks
    out: _Tokens | None = None
    at = 0
    for k in files:
        piece = _read_file(store, temp.run_name, hooks, file_name(machine, k))
        meter.hold(piece.n)
        if out is None:
            out = _Tokens(
                {h: torch.empty((n, s.shape[1]), dtype=s.dtype) for h, s in piece.states.items()},
                torch.empty(n, dtype=torch.int32),
                torch.empty(n, dtype=torch.int32),
            )
            meter.hold(n)
        for h, s in piece.states.items():
            out.states[h][at : at + piece.n] = s
        out.ids[at : at + piece.n], out.pos[at : at + piece.n] = piece.ids, piece.pos
        at += piece.n
        meter.drop(piece.n)
    if out is None or at != n:
        raise FormatError(f"{store.url(temp.run_name)}: bucket files hold {at} tokens, not {n}; run the shuffle again")
    return out


def _streams(
    store: Store, temp: RunRecord, counts: np.ndarray, pad_files: int, seed: int, meter: Meter, begin: int
) -> Iterator[tuple[int, _Tokens, np.ndarray]]:
    """(bucket, its tokens, their order) from bucket `begin` on: each bucket's real tokens permuted,
    then the padding (bucket `buckets`) in source order."""
    index = piece_index(counts)
    buckets = counts.shape[1]
    for b in range(begin, buckets + 1):
        if b < buckets:
            files = index[:, b][index[:, b] >= 0]
            tokens = _load_bucket(store, temp, PIECES, files.tolist(), int(counts[:, b].sum()), meter)
            real = np.flatnonzero(tokens.pos.numpy() >= 0)
            order = real[permutation(real.size, mix_seed(seed, "shuffle", "bucket", b))]
        else:
            if not pad_files:
                return
            head = lambda k: fetch_header(store, join(temp.run_name, temp.hooks[0], file_name(PADDING, k)))  # noqa: E731
            n = sum(head(k).rows for k in range(pad_files))
            tokens = _load_bucket(store, temp, PADDING, range(pad_files), n, meter)
            order = np.arange(n)
        yield b, tokens, order
        meter.drop(tokens.n)


def _gather(
    src: _Run,
    out: RunWriter,
    temp: RunRecord,
    counts: np.ndarray,
    pad_files: int,
    seed: int,
    meter: Meter,
    claim: MachineLock,
) -> None:
    """Pass 2: DST's files from the buckets in order, resumed at the cursor of its progress record."""
    seq, buckets = src.seq, counts.shape[1]
    per_file = next(iter(src.metadata.values())).rows_per_file * seq
    cursor = out.resumed.data_state or {"bucket": 0, "offset": 0}
    begin, skip = int(cursor["bucket"]), int(cursor["offset"])
    staging: _Tokens | None = None
    filled = 0
    inflight: deque[Future[None]] = deque()
    for b, tokens, order in _streams(out.store, temp, counts, pad_files, seed, meter, begin):
        a, skip = skip, 0
        while a < order.size:
            claim.check()
            if staging is None:
                staging = _Tokens(
                    {h: torch.empty((per_file, s.shape[1]), dtype=s.dtype) for h, s in tokens.states.items()},
                    torch.empty(per_file, dtype=torch.int32),
                    torch.empty(per_file, dtype=torch.int32),
                )
                meter.hold(per_file)
            take = min(per_file - filled, order.size - a)
            idx = torch.from_numpy(order[a : a + take])
            for h, s in tokens.states.items():
                torch.index_select(s, 0, idx, out=staging.states[h][filled : filled + take])
            staging.ids[filled : filled + take] = tokens.ids[idx]
            staging.pos[filled : filled + take] = tokens.pos[idx]
            a, filled = a + take, filled + take
            if filled == per_file:
                at = {"bucket": b + 1, "offset": 0} if a == order.size else {"bucket": b, "offset": a}
                inflight.append(_write(out, staging, filled, seq, at))
                staging, filled = None, 0
                while len(inflight) > 1:  # this file and the one before it in flight
                    inflight.popleft().result()
                    meter.drop(per_file)
    if staging is not None and filled:  # the last file, short
        inflight.append(_write(out, staging, filled, seq, {"bucket": buckets + 1, "offset": 0}))
    out.flush()
    meter.drop(per_file * len(inflight))


def _write(out: RunWriter, staging: _Tokens, filled: int, seq: int, at: dict[str, int]) -> Future[None]:
    states, ids, pos = staging.rows(0, filled, seq)
    return out.write_file(states, ids, pos, tokens=int((pos >= 0).sum()), data_state=at, stats={})


# ---- the command --------------------------------------------------------------------------------------


def shuffle_run(
    src_store: Store,
    src: str,
    dst_store: Store,
    dst: str,
    *,
    seed: int = 0,
    memory: int = MEMORY,
    buckets: int | None = None,
) -> ShuffleResult:
    """Write run `dst` as a uniform random permutation of run `src`'s tokens; resumable.

    Args:
        memory: bytes of tokens held at once (buckets are sized from it); `buckets` overrides it.
    """
    t0 = time.perf_counter()
    source = _source(src_store, src)
    src_url = src_store.url(src)
    stored = _check_dest(dst_store, dst, src_url, seed)
    if stored is not None:  # resuming: the stored plan, whatever the memory asked now
        buckets = int(stored.config[PROVENANCE]["buckets"])
    elif buckets is None:
        buckets = choose_buckets(source, memory)
    if buckets < 1:
        raise ConfigError(f"buckets={buckets}: pass a whole number >= 1")
    counts = bucket_counts(source.slots, buckets, seed)
    meter = Meter()
    result = ShuffleResult(src_url, dst_store.url(dst), seed, buckets, tokens=sum(source.slots))
    result.bound_tokens = bound_tokens(source, counts)
    record = _dest_record(source, dst, seed, buckets)
    temp = _temp(source, dst)
    with hold_task(dst_store, dst, "shuffle", "being shuffled") as claim:
        out = RunWriter(dst_store, record, _dest_metadata(source, dst), 0)
        if out.resumed.finished:
            result.already, result.files = True, out.resumed.files_done
        else:
            out.join()
            out.begin()
            try:
                _scatter(source, dst_store, temp, counts, seed, meter, claim)
                pads = read_progress(dst_store, temp[0].run_name, PADDING)
                pad_files = pads.files_done if pads is not None else 0
                _gather(source, out, temp[0], counts, pad_files, seed, meter, claim)
                out.finish({"bucket": buckets + 1, "offset": 0}, source.stats)
            except BaseException:
                out.abort()
                raise
            result.files = out.files
        for e in dst_store.list(join(dst, TEMP)):  # the buckets, once DST is finished
            dst_store.delete(e.key)
    result.peak_tokens, result.seconds = meter.peak, time.perf_counter() - t0
    return result


def run_shuffle(src_uri: str, dst_uri: str, seed: int = 0, memory: int = MEMORY) -> int:
    """`activault shuffle SRC DST`: shuffle and print what was written."""
    (src_store, src), (dst_store, dst) = _place(src_uri), _place(dst_uri)
    dst_store.check(write=True)
    r = shuffle_run(src_store, src, dst_store, dst, seed=seed, memory=memory)
    if r.already:
        print(f"{r.dest} is already a finished shuffle of {r.source} (seed {r.seed}): nothing to do")
        return 0
    print(
        f"{r.dest}: {r.tokens} token slots of {r.source} in {r.files} file(s), uniformly permuted (seed "
        f"{r.seed}, {r.buckets} bucket(s), at most {r.peak_tokens} tokens held) in {r.seconds:.1f}s"
    )
    return 0
