"""Export: hooks of a run into a new SAELens activation cache, atomically.

The run is streamed file by file into a temporary folder beside `out_dir`, renamed into place when
complete: a failed export leaves nothing. A killed one leaves its temporary folder, locked (flock)
while its export lived: the next export to the same `out_dir` removes the ones no process holds.
The dataset's fingerprint is a hash of what is written, so an export is the same bytes each time.
A destination that is a symbolic link is refused before anything is read.

Padding: every row is exported, so every real token is. A SAELens row has exactly context_size
tokens, so the last row of a machine that ran out of data (position -1 in the vault) keeps its
padding as stored: the tokenizer's pad id (else its EOS) and zero activations. SAELens drops
those tokens with `exclude_special_tokens=True` (its default, False, trains on them);
`activault.json` lists them (`padding`: [row, first, stop) token ranges), and import stores
them as padding again, with or without the `positions` column.
Arrow has no bfloat16, so bfloat16 states are exported as float32 (exact); `activault.json`
records each column's hook and stored dtype, and import restores them, so vault -> cache -> vault
gives back the same states and token ids bit for bit.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from activault import dtypes
from activault.errors import ConfigError, FormatError
from activault.integrations import shared as v
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
    padding_rows: int = 0  # rows holding padding (position -1), exported whole
    padding_tokens: int = 0  # padding tokens in them (pad id, zero activations)
    padding: list[list[int]] = field(default_factory=list, repr=False)  # [row, first, stop) per padded run
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
    result = ExportResult(str(out))
    t0 = time.perf_counter()
    tmp: Path | None = None
    claim: int | None = None
    try:
        shapes = cache.shapes
        if any(s is None for s in shapes):
            raise FormatError(
                f"{run_uri}: no metadata.json for {hooks}; export reads runs written by collect or import"
            )
        provenance = _provenance(run_uri, store_options)  # cfg.json read before anything is written
        seq = shapes[0].seq_len  # type: ignore[union-attr]
        d = {h: s.d_model for h, s in zip(hooks, shapes, strict=True)}  # type: ignore[union-attr]
        stored = {h: s.dtype for h, s in zip(hooks, shapes, strict=True)}  # type: ignore[union-attr]
        want = {h: _export_dtype(stored[h], dtype) for h in hooks}
        feats = features(names, seq, d, {h: ARROW_DTYPES[want[h]] for h in hooks}, positions)
        _clear_leftovers(out)
        new = out.parent / f"{_temp_prefix(out)}{uuid.uuid4().hex[:8]}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            new.mkdir()
        except OSError as e:
            raise ConfigError(
                f"cannot create {new}, where the cache is written before it is renamed to {out}: "
                f"{e.strerror or e}; choose a destination in a folder you can write to"
            ) from None
        tmp, claim = new, _claim(new)
        digest = xxhash.xxh3_64(json.dumps(feats.to_dict(), sort_keys=True).encode())
        files = _write_shards(cache, tmp, hooks, names, want, feats, positions, shard_bytes, result, digest)
        if not files:
            raise ConfigError(f"{run_uri}: no rows to export (the run is empty)")
        finish_dataset(tmp, files, feats, digest.hexdigest())
        result.arrow_files = len(files)
        columns_info = {names[h]: {"hook": h, "dtype": dtypes.name(stored[h])} for h in hooks}
        _write_sidecar(tmp, run_uri, columns_info, positions, result, provenance)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if claim is not None:
            os.close(claim)
        cache.finalize()
    result.seconds = time.perf_counter() - t0
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
    if out.is_symlink():
        # The finished cache is renamed into place: a link would be replaced, never written through.
        target = os.readlink(out)
        where = f"the folder it points to ({out.parent / target})" if out.exists() else "another path"
        raise ConfigError(
            f"{out} is a symbolic link (to {target}{'' if out.exists() else ', which does not exist'}): "
            f"an export writes a new folder and never follows a link; pass {where} as the destination"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: SAELens caches are written to a new folder")
    return names, out


def _temp_prefix(out: Path) -> str:
    """The temporary folders of exports to `out` are `.{name}.tmp-{8 hex}` beside it."""
    return f".{out.name}.tmp-"


def _claim(tmp: Path) -> int | None:
    """Hold an flock on the temporary folder while the export lives (the kernel drops it however
    the process ends): a rerun removes only folders no process holds. None where the filesystem
    has no flock (that folder is then never removed by a rerun)."""
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _clear_leftovers(out: Path) -> int:
    """Remove the temporary folders that killed exports to `out` left: its name pattern, a real
    folder (not a link), and no process holds its flock. Returns how many were removed."""
    pattern = re.compile(re.escape(_temp_prefix(out)) + "[0-9a-f]{8}")
    removed = 0
    try:
        names = os.listdir(out.parent)
    except OSError:
        return 0  # no folder yet, or not readable: creating the export's own folder says why
    for p in [out.parent / n for n in names if pattern.fullmatch(n)]:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # a real folder, not a link
        except OSError:
            continue  # not a folder (then not ours), or removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.warning("%s: cannot tell whether an export still writes it (%s); left as it is", p, e.strerror)
            os.close(fd)
            continue  # another export to the same folder is writing it
        try:
            shutil.rmtree(p)
            removed += 1
        except OSError as e:
            raise ConfigError(
                f"cannot remove {p}, the unfinished folder of an earlier, killed export to {out}: "
                f"{e.strerror or e}; make {out.parent} writable, then run the export again"
            ) from None
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d unfinished folder(s) of earlier, killed exports to %s", removed, out)
    return removed


def _provenance(run_uri: str, store_options: dict[str, Any] | None) -> dict[str, str]:
    """How the run's rows were made, for an import to record: a collection packs documents into
    isolated segments (none attends to another); an import says what its source said."""
    record = v.read_run(v.open_store(run_uri, **(store_options or {})), "", original_ok=True)
    if record is not None and record.imported_from is not None:
        src = record.imported_from
        return {"packing": src.packing, "cross_document_attention": src.cross_document_attention}
    if record is not None and record.original is None:
        return {"packing": "isolated segments", "cross_document_attention": "none"}
    return {"packing": "unknown", "cross_document_attention": "unknown"}


def _write_sidecar(
    tmp: Path, run_uri: str, columns: dict[str, Any], positions: bool, result: ExportResult, provenance: dict[str, str]
) -> None:
    """activault.json: where the cache came from, each column's hook and stored dtype, its padding."""
    sidecar = {
        "format": "activault-saelens-cache",
        "format_version": 1,
        "source": str(run_uri),
        "columns": columns,
        "rows": result.rows,
        "tokens": result.tokens,
        "positions": positions,
        "padding_tokens": result.padding_tokens,
        "padding": result.padding,
        "provenance": provenance,
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
    digest: Any,
) -> list[str]:
    """Stream every megabatch into Arrow files of about `shard_bytes`; return their temporary names.
    `digest` (the dataset's fingerprint) takes every file's name and every value written to it."""
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
            _note_padding(pos, result)
            if writer is None:
                files.append(f"part-{len(files):05d}.arrow")
                digest.update(files[-1].encode())
                writer = ArrowWriter(features=feats, path=str(tmp / files[-1]))
                written = 0
            ids = item["input_ids"]
            states = {h: s.to(want[h]) for h, s in item["states"].items()}
            # An Arrow list holds < 2^31 values: write rows in chunks that stay below it.
            step = max(1, (2**31 - 1) // (ids.shape[1] * max(s.shape[2] for s in states.values())))
            for a in range(0, ids.shape[0], step):
                parts = {names[h]: states[h][a : a + step].contiguous() for h in hooks}
                cols = {c: arrow_2d(feats[c](), x) for c, x in parts.items()}
                parts[TOKEN_IDS] = ids[a : a + step].to(torch.int32).contiguous()
                cols[TOKEN_IDS] = arrow_ids(parts[TOKEN_IDS])
                if positions:
                    parts[POSITIONS] = pos[a : a + step].to(torch.int32).contiguous()
                    cols[POSITIONS] = arrow_ids(parts[POSITIONS])
                for x in parts.values():
                    digest.update(x.reshape(-1).view(torch.uint8).numpy())
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


def _note_padding(pos: torch.Tensor, result: ExportResult) -> None:
    """Count the padding (position -1) of the next rows `pos: [rows, seq]` of the cache and note each
    run of it as [row, first, stop) (only the last row of a machine that ran out holds any)."""
    pad = pos < 0
    for r in pad.any(dim=1).nonzero().flatten().tolist():
        zero = torch.zeros(1, dtype=torch.int8)
        edges = torch.diff(pad[r].to(torch.int8), prepend=zero, append=zero)  # +1 where padding starts, -1 after
        starts, stops = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        result.padding += [[result.rows + r, int(a), int(b)] for a, b in zip(starts, stops, strict=True)]
        result.padding_rows += 1
        result.padding_tokens += int(pad[r].sum())
