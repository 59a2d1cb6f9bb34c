"""Import: a SAELens activation cache into a normal run, resumable.

The run gets cfg.json, metadata.json, statistics.json, a progress record and megabatch files,
written by the run writer (vault/writer.py) as collect writes them (each file, then the record
counting it), so a killed import run again resumes at the next file. A SAELens cache has no
document boundaries: each row becomes one document (positions 0..context_size-1), unless the cache
has the `positions` column that `export_saelens(positions=True)` adds; the padding an export's
`activault.json` lists stays padding (position -1), stored with zero states as collect stores it
(the encoder's rule), whatever the cache holds there.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError
from activault.integrations import shared as v
from activault.integrations.saelens_cache.layout import (
    POSITIONS,
    TOKEN_IDS,
    CachedActivations,
    chunks,
    open_cache,
)
from activault.storage.lock import MachineLock, hold
from activault.storage.uri import is_s3

FILE_BYTES = 256 << 20  # megabatch files written by import
MODEL = "imported from SAELens cache"  # the `model` of the files' headers and metadata


@dataclass
class ImportResult:
    run: str
    rows: int = 0
    tokens: int = 0
    files: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    resumed_at_row: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # hook -> stored tokens with NaN/Inf, as collect counts
    provenance: str = ""  # where the rows came from and whether their documents attended to each other


def import_saelens(
    cache_dir: str | Path,
    dest: str | v.Store,
    *,
    run_name: str | None = None,
    hooks: Sequence[str] | Mapping[str, str] | None = None,
    dtype: str | torch.dtype | None = None,
    rows_per_file: int | None = None,
    model: str | None = None,
) -> ImportResult:
    """Write a SAELens activation cache as a run, resuming a killed import of the same cache.

    Args:
        dest: the run's URI (`PATH/RUN`, `s3://BUCKET[/PREFIX]/RUN`), or a Store with `run_name`.
        hooks: columns to import (default every activation column), or `{column: hook name}`;
            an export's `activault.json` restores the original hook names.
        dtype: stored dtype; default the exported run's (from `activault.json`), else the cache's.
        rows_per_file: rows per megabatch file (default: about 256 MiB per file).
        model: the model's name or path, recorded in cfg.json (a cache does not say).
    """
    if rows_per_file is not None and (
        isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1
    ):
        # was: 0 silently meant the default, a negative count an "invalid config" naming no option
        raise ConfigError(
            f"rows_per_file={rows_per_file!r}: give a whole number of rows of at least 1, or leave it out"
        )
    store, run = _destination(dest, run_name)
    cache = open_cache(cache_dir, hooks, dtype)
    if cache.table.num_rows == 0:
        raise ConfigError(f"{cache.path} holds no rows")
    source = v.ImportSource(
        format="saelens-cached-activations",
        path=str(cache.path),
        fingerprint=cache.fingerprint,
        rows=cache.table.num_rows,
        documents="positions column" if cache.positions else "one per row",
        **cache.provenance,  # else unknown: a SAELens cache packs documents that attend to each other
    )
    old = _stored(store, run)
    known = {"packing": source.packing, "cross_document_attention": source.cross_document_attention}
    if old is not None and (old.imported_from is None or old.imported_from.model_copy(update=known) != source):
        raise ConfigError(f"{store.url(run)} already holds a run (not an import of this cache): choose a new run name")
    progress = _progress(store, run) if old is not None else None  # read once the run is known an import
    if old is not None and rows_per_file is None:  # resuming: the files already written fix it
        rows_per_file = int(old.config["data_config"]["batch_size"])
    itemsize = max(cache.stored_dtypes[c].itemsize * cache.dims[c] for c in cache.hooks)
    rpf = rows_per_file or max(1, FILE_BYTES // (cache.seq * itemsize))
    record = _run_record(run, cache, rpf, model, source)
    # Versions and provenance aside (an import written by an older activault resumes and is upgraded).
    versions = {
        "format_version": record.format_version,
        "activault_version": record.activault_version,
        "imported_from": source,
    }
    if old is not None and old.model_copy(update=versions) != record:
        raise ConfigError(
            f"{store.url(run)} was imported with other options (hooks, dtype, rows_per_file or model): "
            "run the same import again to resume it, or choose a new run name"
        )
    _check_resume(store, run, progress, rpf, cache.table.num_rows)
    with hold(store, run, 0) as claim:  # one writer per run, as collect holds one per machine
        writer = v.RunWriter(store, record, _metadata(run, cache, rpf), threads=4)
        done = writer.resumed
        result = ImportResult(store.url(run), resumed_at_row=int((done.data_state or {}).get("row", 0)))
        result.provenance = source.provenance()
        if done.finished:
            result.rows, result.tokens, result.files = cache.table.num_rows, done.tokens_done, done.files_done
            return result
        writer.join()
        writer.begin()
        t0 = time.perf_counter()
        _import_files(writer, cache, rpf, result, claim)
        result.seconds = time.perf_counter() - t0
    return result


def _stored(store: v.Store, run: str) -> v.RunRecord | None:
    """The run's stored cfg.json, read before anything is written; a damaged one, or files without
    one, is an error naming it: it may be another run, so deleting it is advised only for an import."""
    try:
        record = v.read_run(store, run)
    except FormatError as e:  # was: "delete the run", which may be a collected run whose cfg.json collect rebuilds
        raise FormatError(
            f"{str(e).split('; ')[0]}; if the run is an earlier import of this cache, delete {store.url(run)} "
            "and import again, else choose a new run name (collect rebuilds a collected run's cfg.json)"
        ) from None
    dirs, files = store.list_dir(run) if record is None else ([], [])
    held = [n for n in [*dirs, *(f.key.rsplit("/", 1)[-1] for f in files)] if not n.startswith(".")]  # .locks
    if held:  # was: another run's files and progress record taken as this import's, reported imported
        raise ConfigError(
            f"{store.url(run)} holds {sorted(held)[:5]} but no cfg.json: an import writes cfg.json before "
            "anything else, so these are not one this can resume or write over; choose a new run name"
        )
    return record


def _progress(store: v.Store, run: str) -> v.ProgressRecord | None:
    """The progress record of an import of this cache; a damaged one is an error naming it and the
    repair (importing again gives the same run)."""
    try:
        return v.read_progress(store, run, 0)
    except FormatError as e:
        raise FormatError(f"{str(e).split('; ')[0]}; delete {store.url(run)} and import again") from None


def _check_resume(store: v.Store, run: str, progress: v.ProgressRecord | None, rpf: int, rows: int) -> None:
    """Refuse a progress record whose cursor is not where its files end: resuming from it would
    import rows twice or skip them."""
    if progress is None:
        return
    row = (progress.data_state or {}).get("row", 0)
    want = min(progress.files_done * rpf, rows)
    if isinstance(row, bool) or row != want:
        raise FormatError(
            f"{store.url(v.progress_key(run, 0))}: field 'data_state.row' is {row!r}, but its "
            f"{progress.files_done} file(s) of {rpf} rows end at row {want}; delete {store.url(run)} and import again"
        )


def _run_record(run: str, cache: CachedActivations, rpf: int, model: str | None, source: v.ImportSource) -> v.RunRecord:
    """cfg.json of the imported run: a valid config describing the files, and where they came from."""
    from activault import __version__
    from activault.config import parse_config

    hooks, first = list(cache.hooks.values()), next(iter(cache.hooks))
    dtype = dtypes.name(cache.stored_dtypes[first])
    cfg = parse_config(
        {
            "run_name": run,
            "num_runs": 1,
            "transformer_config": {"model_name": model or "unknown", "dtype": dtype},
            "data_config": {
                "data_key": str(cache.path),
                "n_batches": math.ceil(cache.table.num_rows / rpf),
                "seq_length": cache.seq,
                "batch_size": rpf,
            },
            "upload_config": {"batches_per_upload": 1, "hooks": hooks},
        },
        f"(import of {cache.path})",
    )
    return v.RunRecord(
        activault_version=__version__,
        run_name=run,
        config=cfg.to_public_dict(),
        hooks=hooks,
        num_runs=1,
        tokenizer=model,
        model={"name": model or "unknown", "d_model": max(cache.dims.values()), "dtype": dtype},
        hook_dims={cache.hooks[c]: d for c, d in cache.dims.items()},
        imported_from=source,
        progress=[v.progress_key("", 0)],
    )


def _destination(dest: str | v.Store, run_name: str | None) -> tuple[v.Store, str]:
    if isinstance(dest, v.Store):
        if not run_name:
            raise ConfigError("importing into a Store needs run_name=")
        return dest, run_name
    uri = str(dest).rstrip("/")
    parent, _, run = uri.rpartition("/")
    if not run or run in (".", "..") or (is_s3(uri) and parent.count("/") < 2):
        raise ConfigError(f"{dest!r} names no run folder: write PATH/RUN or s3://BUCKET[/PREFIX]/RUN")
    store = v.open_store(parent or ".")
    store.check(write=True)
    return store, run_name or run


def _import_files(
    writer: v.RunWriter, cache: CachedActivations, rpf: int, result: ImportResult, claim: MachineLock
) -> None:
    """Every remaining file of every hook through the writer, then the finished record and statistics."""
    resumed = writer.resumed
    stats = {  # running statistics per hook, over every file so far
        h: resumed.stats[h].running() if h in resumed.stats else v.RunningStats(cache.dims[c])
        for c, h in cache.hooks.items()
    }
    inflight: deque[Future[None]] = deque()
    S = cache.seq
    try:
        for a, cols in chunks(cache, result.resumed_at_row, rpf):
            claim.check()  # stop before writing if another importer took the run over
            rows = cols[TOKEN_IDS].numel() // S
            ids = cols[TOKEN_IDS].to(torch.int32).view(rows, S)
            if cache.positions:
                pos = cols[POSITIONS].to(torch.int32).view(rows, S)
            else:
                pos = torch.arange(S, dtype=torch.int32).expand(rows, S).contiguous()
                for r in range(a, a + rows):
                    for first, stop in cache.padding.get(r, ()):
                        pos[r - a, first:stop] = -1
            real = (pos >= 0).reshape(-1)
            states = {
                h: _narrowed(cols[c], cache.stored_dtypes[c], c, a, S, cache.dims[c]).view(rows, S, cache.dims[c])
                for c, h in cache.hooks.items()
            }
            for h, x in states.items():
                flat = x.view(rows * S, -1)
                stats[h].update(flat if bool(real.all()) else flat[real])
            done = writer.write_file(
                states, ids, pos, tokens=int(real.sum()), data_state={"row": a + rows}, stats=stats
            )
            inflight.append(done)
            while len(inflight) > 1:  # bounded memory: this file and the one before it in flight
                inflight.popleft().result()
        writer.finish({"row": cache.table.num_rows}, stats)
    except BaseException:
        writer.abort()
        raise
    result.files, result.rows, result.tokens = writer.files, writer.rows, writer.tokens
    result.nonfinite = {h: s.nonfinite_tokens for h, s in stats.items()}
    result.bytes_written = writer.bytes_written


def _narrowed(col: torch.Tensor, dtype: torch.dtype, name: str, row0: int, seq: int, d: int) -> torch.Tensor:
    """`col` (a file's values of a column, flat) as `dtype`; ConfigError, before the file is written,
    when a finite value becomes Inf there (float32 to float16 beyond 65504): a stored Inf would read
    as one the model computed."""
    out = col.to(dtype)
    if not col.is_floating_point() or torch.finfo(dtype).max >= torch.finfo(col.dtype).max:
        return out
    lost = (out.isinf() & col.isfinite()).reshape(-1)
    if bool(lost.any()):
        i = int(lost.nonzero()[0])
        big = float(col.reshape(-1)[lost].abs().max())
        fits = [n for n in ("bfloat16", "float32") if torch.finfo(dtypes.to_torch(n)).max >= big]
        fix = (
            f"Import into another run with dtype {' or '.join(fits)} (this run's files so far are "
            f"{dtypes.name(dtype)}, and an import resumes only with the dtype it began with)"
            if fits
            else "No dtype a run stores holds it (float32's largest is 3.40282e+38): the cache's values are "
            "not activations a run can keep"
        )
        raise ConfigError(
            f"column {name!r} holds {float(col.reshape(-1)[i])!r} at row {row0 + i // (seq * d)}, token "
            f"{i % (seq * d) // d} ({int(lost.sum())} value(s) of these rows), beyond {dtypes.name(dtype)}'s "
            f"largest ({torch.finfo(dtype).max:g}): stored, it would read as Inf. {fix}; nothing of these "
            "rows was written"
        )
    return out


def _metadata(run: str, cache: CachedActivations, rpf: int) -> dict[str, v.HookMetadata]:
    return {
        h: v.hook_metadata(
            run_name=run,
            hook=h,
            d_model=cache.dims[c],
            dtype=cache.stored_dtypes[c],
            seq_length=cache.seq,
            rows_per_file=rpf,
            batch_size=rpf,
            batches_per_upload=1,
            model=MODEL,
        )
        for c, h in cache.hooks.items()
    }
