"""Export: hooks of a run into a new SAELens activation cache, atomically.

The run is streamed file by file into a temporary folder beside `out_dir`, renamed into place when
complete: a failed export leaves nothing. Rows holding padding (position -1: only in the last row
of a machine that ran out of data) are dropped and counted, since SAELens rows have no padding.
Arrow has no bfloat16, so bfloat16 states are exported as float32 (exact); `activault.json`
records each column's hook and stored dtype, and import restores them, so vault -> cache -> vault
gives back the same states and token ids bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from activault import dtypes
from activault.errors import ConfigError, FormatError
from activault.integrations.saelens_cache.layout import (
    ARROW_DTYPES,
    POSITIONS,
    SIDECAR,
    TOKEN_IDS,
    arrow_2d,
    arrow_ids,
    features,
    finish_dataset,
)

log = logging.getLogger(__name__)

SHARD_BYTES = 500 << 20  # HF `save_to_disk`'s default max_shard_size


@dataclass
class ExportResult:
    out_dir: str
    rows: int = 0
    tokens: int = 0
    padding_rows_dropped: int = 0  # rows holding padding (position -1), not exported
    real_tokens_dropped: int = 0  # non-padding tokens in those rows
    arrow_files: int = 0
    bytes_read: int = 0  # states, ids and positions read from the run
    seconds: float = 0.0


def export_saelens(
    run_uri: str,
    hooks: str | Sequence[str],
    out_dir: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    dtype: str | torch.dtype | None = None,
    positions: bool = False,
    shard_bytes: int = SHARD_BYTES,
    store_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Write hooks of a run as a SAELens activation cache in `out_dir` (new or empty).

    Args:
        run_uri: the run folder, `PATH/RUN` or `s3://BUCKET[/PREFIX]/RUN`.
        hooks: one hook, or several (a transcoder's input and output): one column each, same rows.
        columns: column name per hook, e.g. `{"models.layers.6.post": "blocks.6.hook_resid_post"}`
            (SAELens looks columns up by its `hook_name`); default the hook name.
        dtype: float32 or float16 for every column; default the stored dtype (bfloat16 -> float32).
        positions: also write each token's position in its document (SAELens ignores the column;
            import uses it to keep document boundaries).
        shard_bytes: bytes per Arrow file (whole megabatches each).
    """
    from activault import RCache

    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    names, out = _destination(hooks, columns, out_dir)
    cache = RCache(run_uri, hooks=hooks, return_ids=True, preserve_file_order=True, store_options=store_options)
    shapes = cache.shapes
    if any(s is None for s in shapes):
        raise FormatError(f"{run_uri}: no metadata.json for {hooks}; export reads runs written by collect or import")
    seq = shapes[0].seq_len  # type: ignore[union-attr]
    d = {h: s.d_model for h, s in zip(hooks, shapes, strict=True)}  # type: ignore[union-attr]
    stored = {h: s.dtype for h, s in zip(hooks, shapes, strict=True)}  # type: ignore[union-attr]
    want = {h: _export_dtype(stored[h], dtype) for h in hooks}
    feats = features(names, seq, d, {h: ARROW_DTYPES[want[h]] for h in hooks}, positions)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    result = ExportResult(str(out))
    t0 = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        files = _write_shards(cache, tmp, hooks, names, want, feats, positions, shard_bytes, result)
        if not files:
            raise ConfigError(f"{run_uri}: no rows to export (every row holds padding, or the run is empty)")
        finish_dataset(tmp, files, feats)
        result.arrow_files = len(files)
        columns_info = {names[h]: {"hook": h, "dtype": dtypes.name(stored[h])} for h in hooks}
        _write_sidecar(tmp, run_uri, columns_info, positions, result)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        cache.finalize()
    result.seconds = time.perf_counter() - t0
    if result.padding_rows_dropped:
        log.warning(
            "dropped %d rows holding padding (%d real tokens in them): SAELens rows have no padding",
            result.padding_rows_dropped,
            result.real_tokens_dropped,
        )
    return result


def _destination(
    hooks: list[str], columns: Mapping[str, str] | None, out_dir: str | Path
) -> tuple[dict[str, str], Path]:
    """(column name per hook, the absolute output folder), checked before anything is read."""
    names = {h: (columns or {}).get(h, h) for h in hooks}
    clash = {TOKEN_IDS, POSITIONS} & set(names.values())
    if clash or len(set(names.values())) != len(names):
        raise ConfigError(
            f"column names {sorted(names.values())} repeat or use the reserved {sorted(clash)}: pass columns="
        )
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: SAELens caches are written to a new folder")
    return names, out


def _write_sidecar(tmp: Path, run_uri: str, columns: dict[str, Any], positions: bool, result: ExportResult) -> None:
    """activault.json: where the cache came from, each column's hook and stored dtype, what was dropped."""
    sidecar = {
        "format": "activault-saelens-cache",
        "format_version": 1,
        "source": str(run_uri),
        "columns": columns,
        "rows": result.rows,
        "tokens": result.tokens,
        "positions": positions,
        "padding_rows_dropped": result.padding_rows_dropped,
        "real_tokens_dropped": result.real_tokens_dropped,
    }
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")


def _export_dtype(stored: torch.dtype, dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return stored if stored in ARROW_DTYPES else torch.float32
    want = dtypes.lookup(dtype) if isinstance(dtype, str) else dtype
    if want is None or want not in ARROW_DTYPES:
        raise ConfigError(f"dtype {dtype!r} cannot be stored in Arrow; use float32 or float16")
    return want


def _write_shards(
    cache: Any,
    tmp: Path,
    hooks: list[str],
    names: Mapping[str, str],
    want: Mapping[str, torch.dtype],
    feats: Any,
    positions: bool,
    shard_bytes: int,
    result: ExportResult,
) -> list[str]:
    """Stream every megabatch into Arrow files of about `shard_bytes`; return their temporary names."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    files: list[str] = []
    writer: Any = None
    written = 0
    try:
        for item in cache:
            pos = item["positions"]
            result.bytes_read += sum(s.numel() * s.element_size() for s in item["states"].values())
            result.bytes_read += 8 * pos.numel()
            keep = (pos >= 0).all(dim=1)  # [rows]
            if not bool(keep.all()):
                result.padding_rows_dropped += int((~keep).sum())
                result.real_tokens_dropped += int((pos[~keep] >= 0).sum())
            rows = keep.nonzero().squeeze(1) if not bool(keep.all()) else None
            if rows is not None and rows.numel() == 0:
                continue
            if writer is None:
                files.append(f"part-{len(files):05d}.arrow")
                writer = ArrowWriter(features=feats, path=str(tmp / files[-1]))
                written = 0
            ids = item["input_ids"] if rows is None else item["input_ids"][rows]
            states = {h: (s if rows is None else s[rows]).to(want[h]) for h, s in item["states"].items()}
            # An Arrow list holds < 2^31 values: write rows in chunks that stay below it.
            step = max(1, (2**31 - 1) // (ids.shape[1] * max(s.shape[2] for s in states.values())))
            for a in range(0, ids.shape[0], step):
                cols = {names[h]: arrow_2d(feats[names[h]](), states[h][a : a + step].contiguous()) for h in hooks}
                cols[TOKEN_IDS] = arrow_ids(ids[a : a + step])
                if positions:
                    cols[POSITIONS] = arrow_ids((pos if rows is None else pos[rows])[a : a + step])
                writer.write_table(pa.table(cols))
            result.rows += ids.shape[0]
            result.tokens += ids.numel()
            written += sum(s.numel() * s.element_size() for s in states.values()) + 4 * ids.numel()
            del item, states
            if written >= shard_bytes:
                writer.finalize()
                writer = None
    finally:
        if writer is not None:
            writer.finalize()
    return files
