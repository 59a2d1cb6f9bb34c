"""Vaults written by the original Activault (tilde-research/activault): its records, as it writes them.

```
{run}/cfg.json                            OriginalConfig: its Config.to_dict()
{run}/{hook}/metadata.json                OriginalMetadata: HookUploader._get_metadata
{run}/{hook}/statistics.json              OriginalStatistics: mean, std, norm, M2 (not exact)
{run}/{hook}/{uuid}--{n}_{job}.saved.pt   torch.save of {states, input_ids, tensor_bytes}
```
None of its records has a `format` field; each is recognised by the fields only the original
writes. `records.py` turns them into what activault's readers need; the `.pt` files are decoded by
`megabatch.decode_legacy` (never unpickling code). Activault reads such a vault and never writes
into it: it cannot rebuild the original's records, so no message about one advises `collect`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from activault import dtypes
from activault.errors import ConfigError
from activault.storage.base import Store, join
from activault.vault.megabatch import LEGACY_SUFFIX, STATE_DTYPES, SUFFIX

WHAT = "a vault written by the original Activault (tilde-research/activault)"
# The name its HookUploader._filename gives a file (the README shortens it to {uuid}--{n}.pt).
FILE_PATTERN = "{uuid}--{n}_{slurm_job}.saved.pt"
METADATA_FIX = (
    f"this is {WHAT}, which activault reads but cannot rebuild: restore the file from a copy of the "
    "vault, or remove it (the .pt files are read without it, their shape taken from the first file)"
)
CONFIG_FIX = (
    f"this is {WHAT}, which activault reads but cannot rebuild: restore the file from a copy of the "
    "vault, or read its hook folders (RUN/HOOK) without it"
)
NOT_EXACT = (
    "the original Activault's statistics, which are not exact: they cover machine 0's tokens only, "
    "their std leaves out the variance within each batch (it is the spread of batch means), and "
    "they hold no token count"
)
STATISTICS_DAMAGED_FIX = (
    f"this is {WHAT}, which activault reads but cannot rebuild: restore the file from a copy of the "
    "vault, or remove it (activault does not use the original's statistics, which are not exact)"
)
STATISTICS_FIX = (
    f"{NOT_EXACT}; activault does not normalise with them: read without center/norm_target, or "
    "compute statistics over the activations (vault/stats.py RunningStats)"
)
READ_ONLY = (
    f"{WHAT}, which activault reads (RCache, TokenLoader, ls, inspect, verify, stats) but never "
    "writes into: collect, import or recompress into a run of its own"
)

MAX_D = 1 << 20  # as records.MAX_D
MAX_ROWS = 1 << 32
MAX_BATCHES = 1 << 20
MAX_MACHINES = 100_000  # as records.MAX_MACHINES
Dim = Annotated[int, Field(gt=0, le=MAX_D)]
Floats = Annotated[list[float], Field(min_length=1, max_length=MAX_D, fail_fast=True)]
Count = Annotated[int, Field(ge=0, le=1 << 62)]


class OriginalRecord(BaseModel):
    """Strict, as activault's records: a string is not a number; unknown keys are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class OriginalMetadata(OriginalRecord):
    """{hook}/metadata.json: `shape` of the states it last uploaded, `dtype` as `str(torch.dtype)`.

    The uploader writes it first from one batch (`batch_size` rows), then after every upload from
    the whole file (`batch_size` = its rows) with `bytes_per_file`, the file's size.
    """

    batch_size: int = Field(gt=0, le=MAX_ROWS)
    sequence_length: Dim
    d_in: Dim
    dtype: str = Field(max_length=64)
    batches_per_file: int = Field(gt=0, le=MAX_BATCHES)
    shape: list[int] = Field(min_length=3, max_length=3)
    input_ids_shape: list[int] = Field(min_length=2, max_length=2)
    bytes_per_file: int | None = Field(default=None, gt=0, le=1 << 62)

    @model_validator(mode="after")
    def _consistent(self) -> OriginalMetadata:
        if dtypes.lookup(self.dtype) not in STATE_DTYPES:
            names = ", ".join(f"torch.{dtypes.name(t)}" for t in STATE_DTYPES)
            raise ValueError(f"dtype {self.dtype!r} is not one activations are stored in ({names})")
        if self.shape != [self.batch_size, self.sequence_length, self.d_in]:
            raise ValueError(f"shape {self.shape} is not [batch_size, sequence_length, d_in]")
        if self.input_ids_shape != [self.batch_size, self.sequence_length]:
            raise ValueError(f"input_ids_shape {self.input_ids_shape} is not [batch_size, sequence_length]")
        return self

    @property
    def states_dtype(self) -> torch.dtype:
        found = dtypes.lookup(self.dtype)
        assert found is not None  # validated
        return found

    @property
    def rows_per_file(self) -> int:
        """Written after an upload (`bytes_per_file` set), `batch_size` is a file's rows; else one batch's."""
        return self.batch_size if self.bytes_per_file is not None else self.batch_size * self.batches_per_file


class OriginalStatistics(OriginalRecord):
    """{hook}/statistics.json, written by machine 0 from its own tokens: see `NOT_EXACT`."""

    mean: Floats
    std: Floats
    norm: float | None = None
    """The mean L2 norm of machine 0's tokens."""
    M2: Floats | None = None

    @model_validator(mode="after")
    def _lengths(self) -> OriginalStatistics:
        if len(self.std) != len(self.mean) or (self.M2 is not None and len(self.M2) != len(self.mean)):
            raise ValueError(f"mean, std and M2 differ in length (mean has {len(self.mean)} values)")
        if any(v < 0 for v in self.std) or (self.norm is not None and self.norm < 0):
            raise ValueError("a std or norm is negative")
        return self


class OriginalUpload(OriginalRecord):
    hooks: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    batches_per_upload: int = Field(default=1, gt=0, le=MAX_BATCHES)


class OriginalConfig(OriginalRecord):
    """{run}/cfg.json: the config it was run with and machine 0's counters."""

    run_name: str = Field(min_length=1)
    transformer_config: dict[str, Any]
    data_config: dict[str, Any] = Field(default_factory=dict)
    upload_config: OriginalUpload
    num_runs: int = Field(default=1, ge=1, le=MAX_MACHINES)
    total_tokens: Count = 0
    d_model: Dim | None = None
    n_total_files: Count = 0
    batches_processed: Count = 0

    @property
    def model_name(self) -> str | None:
        name = self.transformer_config.get("model_name")
        return name if isinstance(name, str) and name else None


# ---- recognising them ----------------------------------------------------------------------------


def is_metadata(obj: Mapping[str, Any]) -> bool:
    """A metadata.json of the original: its field names, and no `format`."""
    return "format" not in obj and bool(obj.keys() & {"d_in", "sequence_length", "batches_per_file", "input_ids_shape"})


def is_statistics(obj: Mapping[str, Any]) -> bool:
    """A statistics.json of the original: `M2`, or a `mean` without activault's count and width."""
    ours = {"count", "d_model", "stats_version", "machines", "m2"}
    return "M2" in obj or ("mean" in obj and not obj.keys() & ours)


def is_config(obj: Mapping[str, Any]) -> bool:
    """A cfg.json of the original: its config sections at the top level, and no `format`."""
    return "format" not in obj and bool(obj.keys() & {"transformer_config", "upload_config"})


def holds_original_files(store: Store, folder: str) -> bool:
    """Whether a hook folder holds the original's `.pt` files and none of activault's."""
    names = [e.key for e in store.list_dir(folder)[1]]
    return any(n.endswith(LEGACY_SUFFIX) for n in names) and not any(n.endswith(SUFFIX) for n in names)


def is_original_run(store: Store, run: str) -> bool:
    """Whether the run's hook folders (the first few) hold the original's files."""
    return any(holds_original_files(store, join(run, d)) for d in store.list_dir(run)[0][:4])


# ---- as activault's records (records.py validates these fields) -------------------------------------


def hook_fields(meta: OriginalMetadata) -> dict[str, Any]:
    """HookMetadata's fields for what an original hook folder's files hold."""
    rows, batches = meta.rows_per_file, meta.batches_per_file
    per_batch, batches = (rows // batches, batches) if rows % batches == 0 else (rows, 1)
    seq, d, name = meta.sequence_length, meta.d_in, dtypes.name(meta.states_dtype)
    return {
        "shape": [rows, seq, d],
        "dtype": name,
        "d_model": d,
        "seq_length": seq,
        "batch_size": per_batch,
        "batches_per_upload": batches,
        "rows_per_file": rows,
        # Not yet written: the tensors' bytes (int64 ids, 8 bytes a token as our ids and positions
        # take); torch.save adds a few hundred.
        "bytes_per_file": meta.bytes_per_file or rows * seq * (d * meta.states_dtype.itemsize + 8),
        "tensors": {"states": {"dtype": name, "shape": ["rows", seq, d]}, "input_ids": {"shape": ["rows", seq]}},
        "file_pattern": FILE_PATTERN,
        "original": meta,
    }


def run_fields(cfg: OriginalConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """RunRecord's fields for an original run (`raw`: its cfg.json, kept as the config)."""
    hooks = cfg.upload_config.hooks
    return {
        "run_name": cfg.run_name,
        "config": raw,
        "model": {"name": cfg.model_name} if cfg.model_name else {},
        "tokenizer": cfg.model_name,
        "hooks": hooks,
        "hook_dims": dict.fromkeys(hooks, cfg.d_model) if cfg.d_model else {},
        "num_runs": cfg.num_runs,
        "original": cfg,
    }


def refuse_write(url: str) -> ConfigError:
    """The error of a write into an original vault."""
    return ConfigError(f"{url} is part of {READ_ONLY}")
