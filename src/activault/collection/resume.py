"""What a run's records say of its config, and refusing to continue a run with a config that would
change what it stores.

Every config field is classified once, here. A field that *shapes the data* decides the stored
bytes or which tokens come next: resuming with another value would put two datasets under one
run name (float32 and bfloat16 files in one hook folder, a second tokenizer's ids, rows of another
length). A *runtime* field only changes how the work is done, so it may differ between attempts.
tests/collection/test_resume.py asserts every Config field is in `FIELDS`: a new field cannot be forgotten.
The records a collection writes (`run_record`, `hook_metadata`) are built from the config here too;
the vault's writer gets them as typed values and never sees a Config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from activault.collection.sources import DataSource, source_for
from activault.config import Config, DataConfig
from activault.errors import ConfigError
from activault.vault import codec as codecs
from activault.vault import records
from activault.vault.records import HookMetadata, RunRecord

Kind = Literal["data", "runtime"]

FIELDS: dict[str, Kind] = {
    "run_name": "data",
    "num_runs": "data",  # how documents are shared among machines
    "storage": "runtime",  # where the run lives, not what it holds (a copied run resumes there)
    "transformer_config.model_name": "data",
    "transformer_config.dtype": "data",
    "transformer_config.cache_dir": "runtime",
    "transformer_config.kwargs": "data",  # revision, trust_remote_code, ...: which weights load
    # Placement and kernels change floating-point rounding only, as moving to another GPU does:
    # the same tokens, shapes, dtype and quantity are stored, and every kernel isolates packed
    # documents. Refusing them would forbid resuming on another machine or without flash-attn.
    "transformer_config.max_per_device_memory": "runtime",
    "transformer_config.attn_implementation": "runtime",
    "transformer_config.device": "runtime",
    "data_config.data_key": "data",
    "data_config.registry": "data",  # the entry it names picks columns, templates and filters
    "data_config.text_field": "data",
    "data_config.messages_field": "data",
    "data_config.n_batches": "data",  # files per machine, and where the last (partial) one ends
    "data_config.seq_length": "data",
    "data_config.batch_size": "data",  # rows per file
    "data_config.bucket_name": "runtime",  # a location, like storage
    "data_config.seed": "data",
    "data_config.skip_cache": "data",  # a run that stored nothing cannot grow files midway
    "data_config.start_batch": "data",
    "data_config.clean_added_tokens": "data",
    "data_config.clean_default_system_prompt": "data",
    "data_config.shuffle_buffer": "data",
    "data_config.align_to": "data",  # which run's tokens this one's files hold
    # Skipping or stopping at a bad record never changes what a good record becomes: a run
    # stopped by `error` continues with `skip` exactly as if it had skipped from the start.
    "data_config.on_bad_record": "runtime",
    "upload_config.batches_per_upload": "data",
    "upload_config.hooks": "data",
    "upload_config.max_pending": "runtime",
    "upload_config.write_threads": "runtime",
    "upload_config.price_per_gb_month": "runtime",
    "upload_config.lease_seconds": "runtime",
    "upload_config.on_nonfinite": "runtime",  # warn stores and counts, error stops: never different bytes
    # fp8 is lossy: one run must not hold two precisions (`activault recompress` converts a whole
    # run). The zstd level and chunk size change only how bytes are packed: decoded bit for bit.
    "upload_config.compression": "data",
    "upload_config.compression_level": "runtime",
    "upload_config.compression_chunk_kib": "runtime",
}

# Facts cfg.json records about the model: another checkpoint at the same path changes them.
MODEL_FACTS = ("architecture", "model_type", "d_model", "n_layers", "vocab_size")
# cfg.json's own copies of data fields, compared when it holds no config (an import's, or older).
RECORD_FIELDS = {"num_runs": "num_runs", "upload_config.hooks": "hooks"}


def run_record(
    cfg: Config,
    model: dict[str, Any],
    tokenizer: str,
    hook_dims: dict[str, int],
    version: str,
    aligned_to: str | None = None,
) -> RunRecord:
    """cfg.json of a run collected with `cfg` (`model`: the checkpoint's facts; `tokenizer`: `tokenizer_ref`,
    its revision is `config.transformer_config.kwargs`'s; `aligned_to`: the URL of the run aligned to)."""
    return RunRecord(
        activault_version=version,
        run_name=cfg.run_name,
        config=cfg.to_public_dict(),
        model=model,
        tokenizer=tokenizer,
        hooks=list(cfg.upload_config.hooks),
        hook_dims=dict(hook_dims),
        num_runs=cfg.num_runs,
        progress=[records.progress_key("", m) for m in range(cfg.num_runs)],
        source=_source_or_none(cfg.data_config),
        aligned_to=aligned_to,
    )


def _source_or_none(data_cfg: DataConfig) -> dict[str, Any] | None:
    # collect resolves the source before this (its error is reported there); a record built
    # elsewhere from a config whose files are not here simply leaves it out.
    try:
        return source_record(data_cfg)
    except ConfigError:
        return None


def source_record(data_cfg: DataConfig) -> dict[str, Any]:
    """cfg.json's `source`: the source `data_cfg` resolves to, local files named absolutely (readers
    of the run, such as `activault context`, run from anywhere)."""
    spec = source_for(data_cfg)
    files = spec.data_files
    if files is not None:
        files = tuple(str(Path(f).resolve()) if Path(f).is_file() else f for f in files)
    return json.loads(json.dumps(asdict(replace(spec, data_files=files))))


def source_from_record(source: Mapping[str, Any]) -> DataSource:
    """The DataSource cfg.json's `source` describes; ConfigError if it does not describe one."""
    try:
        fields = dict(source)
        for name in ("data_files", "turns"):
            if fields.get(name) is not None:
                fields[name] = tuple(tuple(t) if name == "turns" else t for t in fields[name])
        return DataSource(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cfg.json's source {source!r} does not describe a text source ({e})") from None


def tokenizer_ref(model_name: str) -> str:
    """How cfg.json names the tokenizer: a local folder absolutely (readers run from anywhere), else the hub id."""
    path = Path(model_name).expanduser()
    return str(path.resolve()) if path.is_dir() else model_name


def hook_metadata(
    cfg: Config, hook_dims: Mapping[str, int], dtype: torch.dtype, codec: codecs.Codec | None
) -> dict[str, HookMetadata]:
    """Each hook's metadata.json of a run collected with `cfg`, storing `dtype`."""
    dc, uc = cfg.data_config, cfg.upload_config
    return {
        h: records.hook_metadata(
            run_name=cfg.run_name,
            hook=h,
            d_model=hook_dims[h],
            dtype=dtype,
            seq_length=dc.seq_length,
            rows_per_file=cfg.rows_per_file,
            batch_size=dc.batch_size,
            batches_per_upload=uc.batches_per_upload,
            model=cfg.transformer_config.model_name,
            compression=codec,
            provenance=True,  # collection stores each token's document (format 4 on)
        )
        for h in uc.hooks
    }


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of the config tree."""
    out = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += config_fields(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


MISSING = object()


def _default(path: str) -> Any:
    """The field's default (what a config written before the field existed meant), or MISSING."""
    model: type[BaseModel] = Config
    *sections, leaf = path.split(".")
    for s in sections:
        model = model.model_fields[s].annotation  # type: ignore[assignment]
    info = model.model_fields[leaf]
    if info.is_required():
        return MISSING
    value = info.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def lookup(tree: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` of a stored config, else the field's default (MISSING if required)."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _default(path)
        node = node[part]
    return node


def changed_fields(stored: RunRecord, record: RunRecord) -> list[tuple[str, Any, Any]]:
    """(field, stored value, new value) for each data-shaping difference of two cfg.json records."""
    old_cfg, new_cfg = stored.config, record.config
    diffs = []
    # A local model folder named by another path to it (relative from elsewhere) is the same model:
    # its resolved path, the recorded tokenizer, decides.
    same_model = stored.tokenizer is not None and stored.tokenizer == record.tokenizer
    if old_cfg:
        for path, kind in FIELDS.items():
            old, new = lookup(old_cfg, path), lookup(new_cfg, path)
            if path == "transformer_config.model_name" and same_model:
                continue
            if kind == "data" and old is not MISSING and old != new:
                diffs.append((path, old, new))
    else:
        for path, name in RECORD_FIELDS.items():
            if getattr(stored, name) != getattr(record, name):
                diffs.append((path, getattr(stored, name), getattr(record, name)))
    for fact in MODEL_FACTS:
        if fact in stored.model and stored.model[fact] != record.model.get(fact):
            diffs.append((f"model.{fact} (read from the checkpoint)", stored.model[fact], record.model.get(fact)))
    # The tokenizer is model_name resolved: a relative path from another folder is another tokenizer.
    if stored.tokenizer != record.tokenizer and not any(p == "transformer_config.model_name" for p, _, _ in diffs):
        diffs.append(("tokenizer (transformer_config.model_name, resolved)", stored.tokenizer, record.tokenizer))
    return diffs


def check_resume(stored: RunRecord | None, record: RunRecord, where: str) -> None:
    """Refuse to continue the run of `stored` (its cfg.json, at `where`) with `record`'s config.

    Raises ConfigError naming every field that shapes the data and differs, with both values.
    """
    if stored is None:
        return
    diffs = changed_fields(stored, record)
    if not diffs:
        return
    lines = [f"  {path}: stored {old!r}, this config {new!r}" for path, old, new in diffs]
    raise ConfigError(
        f"run {record.run_name!r} at {where} was collected with another config; resuming would mix two "
        "kinds of data in one run:\n" + "\n".join(lines) + "\nrestore the stored value(s) to continue "
        "this run, or set a new run_name to collect a separate run"
    )
