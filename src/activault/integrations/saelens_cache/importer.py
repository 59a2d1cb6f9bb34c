"""Import: a SAELens activation cache into a normal run, resumable.

The run gets cfg.json, metadata.json, statistics.json, a progress record and megabatch files,
written with collect's commit protocol (each file, then the record counting it), so a killed
import run again resumes at the next file. A SAELens cache has no document boundaries: each row
becomes one document (positions 0..context_size-1), unless the cache has the `positions` column
that `export_saelens(positions=True)` adds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from activault.errors import ConfigError
from activault.integrations import _vault as v
from activault.integrations.saelens_cache.layout import (
    POSITIONS,
    TOKEN_IDS,
    CachedActivations,
    chunks,
    open_cache,
)

FILE_BYTES = 256 << 20  # megabatch files written by import


@dataclass
class ImportResult:
    run: str
    rows: int = 0
    tokens: int = 0
    files: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    resumed_at_row: int = 0


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
    from activault import __version__
    from activault.config import parse_config

    store, run = _destination(dest, run_name)
    cache = open_cache(cache_dir, hooks, dtype)
    n = cache.table.num_rows
    if n == 0:
        raise ConfigError(f"{cache.path} holds no rows")
    itemsize = max(cache.stored_dtypes[c].itemsize * cache.dims[c] for c in cache.hooks)
    rpf = rows_per_file or max(1, FILE_BYTES // (cache.seq * itemsize))
    n_files = math.ceil(n / rpf)
    hook_names = list(cache.hooks.values())
    first = next(iter(cache.hooks))
    cfg = parse_config({
        "run_name": run, "num_runs": 1,
        "transformer_config": {"model_name": model or "unknown", "dtype": v.dtype_name(cache.stored_dtypes[first])},
        "data_config": {"data_key": str(cache.path), "n_batches": n_files, "seq_length": cache.seq, "batch_size": rpf},
        "upload_config": {"batches_per_upload": 1, "hooks": hook_names},
    }, f"(import of {cache.path})")  # fmt: skip
    source = {
        "format": "saelens-cached-activations",
        "path": str(cache.path),
        "fingerprint": cache.fingerprint,
        "rows": n,
        "documents": "positions column" if cache.positions else "one per row",
    }
    record = {
        "format": "activault", "format_version": 1, "activault_version": __version__, "run_name": run,
        "config": cfg.to_public_dict(), "hooks": hook_names, "num_runs": 1, "tokenizer": model,
        "model": {"name": model or "unknown", "d_model": max(cache.dims.values()),
                  "dtype": v.dtype_name(cache.stored_dtypes[first])},
        "hook_dims": {cache.hooks[c]: d for c, d in cache.dims.items()}, "imported_from": source,
        "progress": [v.progress_key(run, 0).split("/", 1)[1]],
    }  # fmt: skip
    old = v.read_json(store, f"{run}/cfg.json")
    if old is not None and old.get("imported_from") != source:
        raise ConfigError(
            f"{store.url(run)} already holds a run (not an import of this cache): choose a new run name"
        )
    progress = v.read_json(store, v.progress_key(run, 0)) or {}
    result = ImportResult(
        store.url(run), resumed_at_row=int((progress.get("data_state") or {}).get("row", 0))
    )
    if progress.get("finished"):
        result.rows, result.tokens, result.files = (
            n,
            int(progress["tokens_done"]),
            int(progress["files_done"]),
        )
        return result
    v.write_json(store, f"{run}/cfg.json", record)
    for h in hook_names:
        store.clear_partial(f"{run}/{h}", "m00000-")
    t0 = time.perf_counter()
    _import_files(store, run, cache, rpf, progress, result)
    v.merge_statistics(store, run, hook_names, 1)
    result.seconds = time.perf_counter() - t0
    return result


def _destination(dest: str | v.Store, run_name: str | None) -> tuple[v.Store, str]:
    if isinstance(dest, v.Store):
        if not run_name:
            raise ConfigError("importing into a Store needs run_name=")
        return dest, run_name
    uri = str(dest).rstrip("/")
    parent, _, run = uri.rpartition("/")
    if not run or run in (".", "..") or (uri.startswith("s3://") and parent.count("/") < 2):
        raise ConfigError(
            f"{dest!r} names no run folder: write PATH/RUN or s3://BUCKET[/PREFIX]/RUN"
        )
    store = v.open_store(parent or ".")
    store.check(write=True)
    return store, run_name or run


def _import_files(
    store: v.Store,
    run: str,
    cache: CachedActivations,
    rpf: int,
    progress: dict[str, Any],
    result: ImportResult,
) -> None:
    """Write megabatch k of every hook, then the progress record counting it (collect's protocol)."""
    stats = {h: v.RunningStats.from_dict(progress["stats"][h]) if h in progress.get("stats", {})
             else v.RunningStats(cache.dims[c]) for c, h in cache.hooks.items()}  # fmt: skip
    k0, start = int(progress.get("files_done", 0)), result.resumed_at_row
    tokens, rows_done = int(progress.get("tokens_done", 0)), int(progress.get("rows_done", 0))
    writer = v.Writer(store, threads=4)
    S = cache.seq
    try:
        for k, (a, cols) in enumerate(chunks(cache, start, rpf), start=k0):
            rows = cols[TOKEN_IDS].numel() // S
            ids = cols[TOKEN_IDS].to(torch.int32).view(rows, S)
            pos = (
                cols[POSITIONS].to(torch.int32).view(rows, S)
                if cache.positions
                else torch.arange(S, dtype=torch.int32).expand(rows, S).contiguous()
            )
            real = (pos >= 0).reshape(-1)
            futures = []
            for c, h in cache.hooks.items():
                x = cols[c].view(rows, S, cache.dims[c]).to(cache.stored_dtypes[c])
                flat = x.view(rows * S, -1)
                stats[h].update(flat if bool(real.all()) else flat[real])
                meta = {"format": "activault", "format_version": "1", "run_name": run, "hook": h, "machine": "0",
                        "file_index": str(k), "model": "imported from SAELens cache"}  # fmt: skip
                parts = v.encode({"states": x, "input_ids": ids, "positions": pos}, meta)
                futures.append(writer.write(f"{run}/{h}/{v.file_name(0, k)}", parts))
            tokens += int(real.sum())
            rows_done += rows
            rec = {"machine": 0, "num_runs": 1, "files_done": k + 1, "rows_done": rows_done, "tokens_done": tokens,
                   "data_state": {"row": a + rows}, "finished": False,
                   "stats": {h: s.to_dict() for h, s in stats.items()}}  # fmt: skip
            metas = _metadata(run, cache, rpf) if k == 0 else {}
            writer.commit(futures, _committer(store, run, rec, metas))
            writer.flush()  # bounded memory: one megabatch in flight per hook
            result.files, result.rows = k + 1, rows_done
        rec = {"machine": 0, "num_runs": 1, "files_done": result.files or k0, "rows_done": rows_done,
               "tokens_done": tokens, "data_state": {"row": cache.table.num_rows}, "finished": True,
               "stats": {h: s.to_dict() for h, s in stats.items()}}  # fmt: skip
        v.write_json(store, v.progress_key(run, 0), rec)
        writer.close()
        result.bytes_written = writer.bytes_written
        result.tokens, result.files, result.rows = tokens, rec["files_done"], rows_done
    except BaseException:
        writer.abort()
        raise


def _metadata(run: str, cache: CachedActivations, rpf: int) -> dict[str, dict[str, Any]]:
    return {h: v.hook_metadata(run_name=run, hook=h, d_model=cache.dims[c], dtype=cache.stored_dtypes[c],
                               seq_length=cache.seq, rows_per_file=rpf, batch_size=rpf, batches_per_upload=1,
                               model="imported from SAELens cache")
            for c, h in cache.hooks.items()}  # fmt: skip


def _committer(store: v.Store, run: str, rec: dict[str, Any], metas: dict[str, dict[str, Any]]):
    def commit() -> None:
        for h, meta in metas.items():
            v.write_json(store, f"{run}/{h}/metadata.json", meta)
        v.write_json(store, v.progress_key(run, 0), rec)

    return commit
