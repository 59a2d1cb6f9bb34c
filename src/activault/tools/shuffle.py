"""`activault shuffle SRC DST`: a new run holding a uniform random permutation of a run's tokens,
in bounded memory, resumable (tools/shuffle_quality.py measures how well a reader mixes).

Two passes over storage (an external bucket shuffle). Pass 1 reads the source's files one at a
time and gives each token slot a bucket, uniformly at random and independently (seeded by the
file): the counts per bucket are a multinomial draw, so every piece's size is known from the
seed and the files' sizes alone. Bucket 0 is gathered in memory; each file's slots of the other
buckets are written, grouped by bucket, as pieces of a temporary run inside DST (`DST/.shuffle`,
through the run writer: checksums, commit protocol), and its padding (position -1) once more
apart. Pass 2 permutes each bucket's real tokens uniformly (seeded by the bucket) and writes them
to DST's files in order: bucket 0 at once, then the others loaded one at a time from their
pieces, the padding last (padding only ends a run's data). Independent uniform buckets, each
permuted uniformly, make a uniform permutation of the whole. A run that fits one bucket is one
pass (no temporary bytes but its padding). Every hook's states move with the same permutation,
and so do token ids, positions and documents (as one stream over the source's machines:
`source_document` traces them back); each token's norms are computed again by the encoder. The
passes are in tools/shuffle_passes.py, the token slots they read and gather in tools/shuffle_tokens.py.

Memory: one bucket (pass 1 gathers bucket 0 into it, pass 2 reuses it; one bucket of a local run
is its mapped files, read where they lie), plus in pass 1 at most 4 source files (the one
scattered, its scattered copy, the previous copy still being written, the next one read ahead), in
pass 2 the pieces read ahead and 2 output files. The shuffle takes the fewest buckets whose bound
(`bound_tokens`, from the seed's counts) fits `memory` (default 4 GiB): one bucket, one pass, for a
run that fits beside pass 1's files; so a run of any size is shuffled within `memory`.

Resume: both passes are deterministic for a seed, and each counts what it wrote in a progress
record (pass 1: the temporary run's; pass 2: DST's, with the stream position as its cursor), so a
killed shuffle run again writes the same bytes (bucket 0, kept in memory, is gathered again from
the source while DST's cursor is in it). DST's statistics are the source's (the same tokens),
merged over the source's machines; its cfg.json is the source's with `config.shuffled_from`
(source run, seed, buckets, source machines, plan). DST's files are stored with the codec the
source's metadata.json names (one for every hook; else raw), a resumed shuffle with the one DST
began with: zstd gives back the same bits, and fp8 the same values (a decoded fp8 token's largest
magnitude is the one it was scaled by, so encoding it again picks the same scale and codes).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import LocalStore, Store, open_store
from activault.storage.base import LOCKS, join
from activault.storage.lock import hold_task
from activault.storage.uri import is_s3
from activault.tools.shuffle_passes import PADDING, Meter, Plan, SourceRun, gather, piece_slots, scatter
from activault.tools.shuffle_plan import bucket_counts
from activault.vault import codec as codecs
from activault.vault.megabatch import DOCUMENTS, fetch_header
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
from activault.vault.stats import merge_all
from activault.vault.writer import RunWriter

TEMP = ".shuffle"  # the temporary bucket run, inside DST (hidden from local listings)
MEMORY = 4 << 30  # default bound on the tokens held at once, in bytes
PROVENANCE = "shuffled_from"  # cfg.json config key: {"run", "seed", "buckets", "machines"}
PLAN = 2  # provenance "plan": 2 = bucket 0 kept in memory by pass 1 (no temporary pieces of it)
DELETERS = 16  # the temporary run's objects deleted this many at once (one request each on S3)


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


# ---- checks before anything is written ----------------------------------------------------------------


def _place(uri: str) -> tuple[Store, str]:
    """(the store holding a run folder, the run's name) of `PATH/RUN` or `s3://BUCKET[/PREFIX]/RUN`."""
    uri = str(uri).rstrip("/")
    parent, _, run = uri.rpartition("/")
    if not run or run in (".", "..") or (is_s3(uri) and parent.count("/") < 2):
        raise ConfigError(f"{uri!r} names no run folder: write PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    return open_store(parent or "."), run


def read_source(store: Store, run: str) -> SourceRun:
    """The source's records and files, once every machine has finished; else an error naming why."""
    url = store.url(run)
    record = read_run(store, run)
    if record is None:
        raise NotFoundError(f"{url} holds no run (no cfg.json): SRC must be a run folder, PATH/RUN")
    if record.original is not None:
        raise ConfigError(f"{url} was written by the original Activault: convert it first; nothing written")
    names: list[str] = []
    machines: list[int] = []
    parts = []
    for m in range(record.num_runs):
        rec = read_progress(store, run, m)
        if rec is None or not rec.finished:
            raise ConfigError(
                f"machine {m} of {url} has not finished collecting: shuffle once collection has "
                "ended (its collect command resumes it); nothing written"
            )
        names += [file_name(m, k) for k in range(rec.files_done)]
        machines += [m] * rec.files_done
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
    slots = [hd.rows * hd.seq_len for hd in headers]
    # Provenance is carried when every file has it (a run resumed across versions may mix them).
    provenance = all(DOCUMENTS in hd.tensors for hd in headers)
    src = SourceRun(store, run, record, metadata, names, slots, machines, provenance)
    src.sizes = listed_sizes(store, run, record.hooks)
    for h in record.hooks:
        merged = merge_all(p[h] for p in parts if h in p)
        if merged is None or any(h not in p for p in parts):
            raise FormatError(f"{url}: a finished progress record has no statistics of hook {h!r}; nothing written")
        src.stats[h] = merged
    return src


def listed_sizes(store: Store, run: str, hooks: list[str]) -> dict[str, int]:
    """key -> size of every object of the run's hook folders (one listing each: a file is then read
    in one request, into a reused buffer)."""
    return {e.key: e.size for h in hooks for e in store.list(join(run, h))}


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
    if prov.get("plan") != PLAN:
        raise ConfigError(
            f"DST {url} was begun by an earlier activault, whose buckets this one lays out otherwise: "
            "nothing written; name a new DST (or finish this one with the version that began it)"
        )
    if prov.get("seed") != seed:
        raise ConfigError(
            f"DST {url} is a shuffle of {src_url} with seed {prov.get('seed')}, not {seed}: rerun with "
            f"--seed {prov.get('seed')} to resume it, or name a new DST"
        )
    return record


def choose_buckets(src: SourceRun, memory: int, seed: int) -> int:
    """The fewest buckets whose stated bound (`bound_tokens`, from the seed's counts) fits `memory`:
    one (one pass) when the run fits beside pass 1's files; ConfigError when none does."""
    total, per, f = sum(src.slots), src.token_bytes, max(src.slots)
    pads = src.record.num_runs * src.seq
    files = 4 * f + pads  # pass 1's files and the padding
    most = max(1, math.ceil(total / f))  # buckets of about a file: no gain beyond
    if memory // per > files:
        # The bound is about `files` plus the largest bucket: the estimate is off by the draw's spread.
        start = min(most, math.ceil(total / (memory // per - files)))
        doubled = {start << i for i in range(1, most.bit_length() + 1) if start << i < most}
        for b in sorted({*range(start, min(start + 8, most) + 1), *doubled, most}):
            if bound_tokens(src, bucket_counts(src.slots, b, seed)) * per <= memory:
                return b
    # Enough for buckets of 2 files at most beside pass 2's pieces (4 files) and 2 output files.
    out = next(iter(src.metadata.values())).rows_per_file * src.seq
    need = (6 * f + pads + 2 * out) * per
    raise ConfigError(
        f"memory={memory} bytes cannot hold the shuffle's files (4 source files and 2 output files of up "
        f"to {f * per} bytes) and a bucket: pass memory >= {need}"
    )


def bound_tokens(src: SourceRun, counts: np.ndarray) -> int:
    """The most token slots the shuffle holds at once (see the module's docstring)."""
    out = next(iter(src.metadata.values())).rows_per_file * src.seq
    pads = src.record.num_runs * src.seq  # padding ends each machine's last row at most
    bucket = int(counts.sum(0).max()) + pads  # bucket 0 from pass 1 on, its buffer reused in pass 2
    return bucket + max(4 * max(src.slots), piece_slots(counts) + 2 * out)


# ---- records of the new run and of its temporary run -------------------------------------------------


def _dest_record(src: SourceRun, dst: str, seed: int, buckets: int) -> RunRecord:
    from activault.version import __version__

    prov = {"run": src.store.url(src.run), "seed": seed, "buckets": buckets, "machines": src.record.num_runs}
    prov["plan"] = PLAN
    return src.record.model_copy(
        update={
            "run_name": dst,
            "num_runs": 1,
            "progress": [progress_key("", 0)],
            "activault_version": __version__,
            "config": {**src.record.config, PROVENANCE: prov},
        }
    )


def _dest_codec(src: SourceRun, store: Store, dst: str) -> codecs.Codec | None:
    """The codec of DST's files: the one DST began with (its metadata.json, once a file is
    written), else the one the source's metadata.json names for every hook (mixed: raw)."""
    began = read_metadata(store, join(dst, src.record.hooks[0]))
    named = [began.compression] if began is not None else [m.compression for m in src.metadata.values()]
    return codecs.from_description(named[0]) if all(d == named[0] for d in named) else None


def _dest_metadata(src: SourceRun, dst: str) -> dict[str, HookMetadata]:
    return {h: m.model_copy(update={"run_name": dst}) for h, m in src.metadata.items()}


def _temp(src: SourceRun, dst: str) -> tuple[RunRecord, dict[str, HookMetadata]]:
    """The temporary run of pieces: one token a row (seq 1), a piece at most a source file, without
    norms (its writers are `norms=False`)."""
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
            norms=False,  # scratch: DST's encoder computes every token's norm
        )
        for h, m in src.metadata.items()
    }
    return record, meta


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
    source = read_source(src_store, src)
    src_url = src_store.url(src)
    stored = _check_dest(dst_store, dst, src_url, seed)
    if stored is not None:  # resuming: the stored plan, whatever the memory asked now
        buckets = int(stored.config[PROVENANCE]["buckets"])
    elif buckets is None:
        buckets = choose_buckets(source, memory, seed)
    if buckets < 1:
        raise ConfigError(f"buckets={buckets}: pass a whole number >= 1")
    counts = bucket_counts(source.slots, buckets, seed)
    meter = Meter()
    result = ShuffleResult(src_url, dst_store.url(dst), seed, buckets, tokens=sum(source.slots))
    result.bound_tokens = bound_tokens(source, counts)
    record = _dest_record(source, dst, seed, buckets)
    temp = _temp(source, dst)
    scratch = scratch_store(dst_store)
    with hold_task(dst_store, dst, "shuffle", "being shuffled") as claim:
        codec = _dest_codec(source, dst_store, dst)
        out = RunWriter(dst_store, record, _dest_metadata(source, dst), 0, codec=codec)
        if out.resumed.finished:
            result.already, result.files = True, out.resumed.files_done
        else:
            out.join()
            out.begin()
            try:
                keep = int((out.resumed.data_state or {}).get("bucket", 0)) == 0  # bucket 0 still to write
                fresh, first = scatter(source, scratch, temp, counts, seed, meter, claim, keep)
                pads = read_progress(scratch, temp[0].run_name, PADDING)
                sizes = listed_sizes(scratch, temp[0].run_name, source.record.hooks)
                plan = Plan(temp[0], counts, pads.files_done if pads else 0, seed, fresh, source.provenance, sizes)
                gather(source, out, plan, meter, claim, first)
                out.finish({"bucket": buckets + 1, "offset": 0}, source.stats)
            except BaseException:
                out.abort()
                raise
            result.files = out.files
        _remove_temp(scratch, dst)  # the buckets, once DST is finished
    result.peak_tokens, result.seconds = meter.peak, time.perf_counter() - t0
    return result


def scratch_store(store: Store) -> Store:
    """Where the temporary run is written: the same store, locally without fsync (scratch: a machine
    that stops loses at most pieces a rerun writes again; DST keeps the store's durability)."""
    if isinstance(store, LocalStore) and store.fsync:
        return LocalStore(store.root, fsync=False, map_reads=store.map_reads)
    return store


def _remove_temp(store: Store, dst: str) -> None:
    """Delete the temporary run, `DELETERS` objects at once."""
    keys = [e.key for e in store.list(join(dst, TEMP))]
    with ThreadPoolExecutor(DELETERS, thread_name_prefix="activault-shuffle-delete") as pool:
        list(pool.map(store.delete, keys))


def shuffled_machines(record: RunRecord) -> int | None:
    """The source's machine count when `record` (cfg.json) is a shuffled run's, else None: its
    documents are then `ordinal * machines + machine` of the source (shuffle_passes.global_documents)."""
    prov = record.config.get(PROVENANCE)
    if not isinstance(prov, dict):
        return None
    machines = prov.get("machines")
    if isinstance(machines, bool) or not isinstance(machines, int) or machines < 1:
        raise FormatError(
            f"cfg.json of {record.run_name!r}: {PROVENANCE}.machines is {machines!r}, not a machine count "
            "(the record is damaged or was edited): shuffle the source again into a new run"
        )
    return machines


def source_document(record: RunRecord, machine: int, document: int) -> tuple[int, int, int]:
    """(machine, document ordinal, machines) of a stored token in its collection: a shuffled run's
    document is traced back to its source machine's stream."""
    machines = shuffled_machines(record)
    if machines is None or document < 0:
        return machine, document, record.num_runs
    return document % machines, document // machines, machines


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
