"""The collection config: one typed tree, validated on construction. YAML is only its serialization.

The original project's schema is accepted unchanged; fields added here all have defaults.
Secrets never live in the config: credentials come from the environment at run time.
"""

from __future__ import annotations

import os
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from activault import dtypes
from activault.errors import ConfigError

MEMORY_RE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
# run_name and each hook name become folder names on every store, and a file name holds 255 bytes
# (with a temp name's 14 added for a write): 200 leaves room.
NAME_MAX = 200


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20}
_UNITS.update({"gib": 1 << 30, "tib": 1 << 40})


def memory_bytes(text: str) -> int:
    """Bytes of a memory size as MEMORY_RE accepts it ("70GiB", "80 GB"); ValueError otherwise."""
    if not MEMORY_RE.match(str(text)):
        raise ValueError(f"{text!r} is not a memory size; write e.g. 70GiB or 80GB")
    number, unit = re.findall(r"[\d.]+|[A-Za-z]+", str(text))
    return int(float(number) * _UNITS[unit.lower()])


# What a run folder holds beside its hook folders (vault/records.py `cfg_key`, `progress_key`): no
# hook may be named so. Spelled here, not imported: the config stays free of the vault's torch imports.
RUN_ENTRIES = ("cfg.json", "progress")


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a run's folder or a hook's (the one check of both), or None."""
    if not name or "/" in name or name.startswith("."):
        return "a folder name: not empty, no '/', no leading '.'"
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return f"a folder name: no control character (it holds {bad!r})"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        return f"a folder name: at most {NAME_MAX} bytes (UTF-8), it has {size}"
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class TransformerConfig(_Section):
    model_name: str = Field(min_length=1)
    """Hub id or local folder of a `transformers` model (its tokenizer is loaded from the same place)."""
    dtype: str = "bfloat16"
    """Weights and stored activations: float32, float16, bfloat16 or auto (the checkpoint's)."""
    cache_dir: str | None = None
    """Where `transformers` caches downloaded weights."""
    max_per_device_memory: str | None = None
    """Cap on weights per GPU for the device map, e.g. "70GiB"; None lets transformers decide."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to `from_pretrained` as they are (e.g. trust_remote_code, revision)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    """Attention kernel; packed documents are isolated on each of them."""
    device: str = "auto"
    """auto (every visible GPU, else the CPU), cpu, cuda or cuda:N."""

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        name = dtypes.canonical(v)
        if name is None:
            raise ValueError(f"unknown dtype {v!r}; use one of float32, float16, bfloat16, auto")
        return name

    @field_validator("max_per_device_memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and not MEMORY_RE.match(str(v)):
            raise ValueError(f"{v!r} is not a memory size; write e.g. 70GiB or 80GB")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v


class DataConfig(_Section):
    data_key: str = Field(min_length=1)
    """A key of the dataset registry (datasets.json) or a local file/glob (.jsonl, .json, .parquet, .txt)."""
    n_batches: int | Literal["all"]
    """Batches for the whole run; with num_runs machines, each collects its share. `all`: every
    machine collects its whole share of the documents, until the data runs out."""
    seq_length: int = Field(gt=0, le=1 << 20)
    """Stored tokens per row."""
    batch_size: int = Field(gt=0)
    """Rows per forward pass."""
    bucket_name: str | None = None
    """S3 bucket used when `storage` is not given and S3 credentials are in the environment."""
    seed: int = 42
    """Seed of the document shuffle (with shuffle_buffer > 0)."""
    skip_cache: bool = False
    """Run the model and compute statistics but store no megabatches (a dry run of throughput)."""
    start_batch: int = Field(default=0, ge=0)
    """Batches of this machine's data to skip before collecting."""
    clean_added_tokens: bool = False
    """Drop BOS/EOS/pad and added special tokens from what is stored (they are still forwarded)."""
    clean_default_system_prompt: bool = False
    """Drop the system turn that the chat template inserts when a conversation has none."""
    shuffle_buffer: int = Field(default=0, ge=0)
    """Documents in the streaming shuffle buffer; 0 keeps the dataset's order."""
    registry: str | None = None
    """Path of a dataset registry JSON to use instead of the packaged datasets.json."""
    on_bad_record: Literal["skip", "error"] = "skip"
    """A local JSON line that is not UTF-8, not JSON, not an object or not text (a lone surrogate
    escape such as "\\ud800"): skip it (counted, and logged with its file and line), or stop the
    run naming them."""
    text_field: str | None = None
    """Local files: the field holding plain text (default `text`)."""
    messages_field: str | None = None
    """Local files: the field holding a conversation, a list of {role, content} (default: the first
    of `messages`, `conversation`, `conversations` present)."""
    align_to: str | None = None
    """A stored run (`PATH/RUN` or `s3://BUCKET[/PREFIX]/RUN`) to collect the same tokens as, with
    this model: its data config is used (source, seq_length, batch_size, packing, seed, n_batches,
    num_runs, batches_per_upload; a key set here to another value is refused), and this model's
    tokenizer must give its stored token ids, so file k of both runs holds the same tokens."""

    @field_validator("align_to")
    @classmethod
    def _align_to(cls, v: str | None) -> str | None:
        if v is not None and not v.strip("/ "):
            raise ValueError("name a run folder, e.g. ./vault/base or s3://bucket/base")
        return v

    @field_validator("n_batches", mode="before")
    @classmethod
    def _n_batches(cls, v: Any) -> Any:
        # One message for both forms, not pydantic's two (one per member of the union).
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"use a whole number of batches > 0, or all to collect until the data runs out (got {v!r})")

    @property
    def until_exhausted(self) -> bool:
        """Whether the run collects until the data runs out (`n_batches: all`)."""
        return self.n_batches == "all"


class UploadConfig(_Section):
    batches_per_upload: int = Field(gt=0)
    """Batches per megabatch file."""
    hooks: list[str] = Field(min_length=1)
    """Where to capture: `models.layers.{i}.{self_attn|mlp}.{pre|post}`, `models.layers.{i}.{pre|post}`
    (residual stream), or any module path of the model with `.pre` (input) / `.post` (output)."""
    max_pending: int = Field(default=2, ge=1)
    """Megabatches per hook held in memory while they are written (the writer's queue bound)."""
    write_threads: int = Field(default=4, ge=1)
    """Concurrent file writes/uploads."""
    price_per_gb_month: float = Field(default=0.023, ge=0)
    """Storage price for the cost estimate (S3 Standard's first tier, USD)."""
    lease_seconds: float = Field(default=120, ge=1)
    """On object storage, a collector's claim on its machine index lapses this long after its last
    renewal (renewed every quarter of it); then another collector may take the machine over."""
    compression: Literal["none", "zstd", "fp8"] = "none"
    """How `states` are stored: none (raw); zstd (lossless: byte planes + zstd, ~0.69 of bf16's bytes
    on real activations); fp8 (LOSSY, opt-in: float8 e4m3 with a float32 scale per token, ~0.45 of
    bf16's bytes, ~3% relative error per token). Each file's header records its own codec, so a
    run's files may differ (e.g. after `activault recompress`)."""
    compression_level: int = Field(default=1, ge=-7, le=22)
    """zstd level; 1 stores the fewest bytes on activations' byte planes (bench/compression.py)."""
    compression_chunk_kib: int = Field(default=4096, ge=1, le=1 << 20)
    """Raw KiB of states per independently compressed chunk (rounded to whole tokens)."""
    on_nonfinite: Literal["error", "warn"] = "warn"
    """Tokens whose activations hold NaN or Inf: `warn` stores them, leaves them out of the statistics
    and counts them (`nonfinite` in the progress record and statistics.json, the final log line;
    readers drop them with `drop_nonfinite=True`); `error` stops before the file that would hold them."""

    @field_validator("hooks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({h for h in v if v.count(h) > 1})
        if dup:
            raise ValueError(f"hooks listed twice: {dup}")
        bad = [h for h in v if name_problem(h)]
        if bad:
            raise ValueError(f"invalid hook names {reprlib.repr(bad)}: each becomes {name_problem(bad[0])}")
        taken = [h for h in v if h in RUN_ENTRIES]
        if taken:  # a hook folder named so would hold (or be) the run's own records
            raise ValueError(
                f"hook names {taken} are the run folder's own entries ({', '.join(RUN_ENTRIES)}): rename them"
            )
        return v


class Config(_Section):
    run_name: str = Field(min_length=1)
    """Folder of this run under the storage root."""
    num_runs: int = Field(default=1, ge=1)
    """Machines sharing the collection; each runs with --machine i, 0 <= i < num_runs."""
    storage: str | None = None
    """Where to store: a path or file:// (local), or s3://bucket[/prefix]. See `resolve_storage`."""
    transformer_config: TransformerConfig
    """The model: which, in what dtype, on which devices."""
    data_config: DataConfig
    """The text: which dataset, how many tokens, how rows are packed and cleaned."""
    upload_config: UploadConfig
    """What is captured and how it is written."""

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]*", v):
            raise ValueError("use letters, digits, '.', '_', '=' and '-' (it becomes a folder name)")
        if problem := name_problem(v):
            raise ValueError(f"it becomes {problem}; shorten it")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> Config:
        d = self.data_config
        if d.n_batches != "all" and d.n_batches < self.num_runs:
            raise ValueError(
                f"data_config.n_batches ({d.n_batches}) is less than num_runs ({self.num_runs}): "
                "some machines would collect nothing"
            )
        return self

    @property
    def rows_per_file(self) -> int:
        return self.data_config.batch_size * self.upload_config.batches_per_upload

    def check_machine(self, machine: int, flag: str = "--machine") -> None:
        """The one check of a machine index: 0 <= machine < num_runs."""
        check_machine(machine, self.num_runs, flag)

    def machine_batches(self, machine: int) -> int | None:
        """Batches machine `machine` collects: n_batches split as evenly as possible; None for
        `n_batches: all` (until its share of the documents runs out)."""
        n, k = self.data_config.n_batches, self.num_runs
        if n == "all":
            return None
        return n // k + (1 if machine < n % k else 0)

    def machine_files(self, machine: int) -> int | None:
        """Files machine `machine` writes at most; None for `n_batches: all`."""
        b = self.machine_batches(machine)
        return None if b is None else -(-b // self.upload_config.batches_per_upload)

    def to_public_dict(self) -> dict[str, Any]:
        """The config as stored in cfg.json (no secrets are in the config by construction)."""
        return self.model_dump(mode="json")


def check_machine(machine: int, num_runs: int, flag: str = "--machine") -> None:
    """Refuse a machine index outside 0..num_runs-1, naming the range."""
    if not 0 <= machine < num_runs:
        raise ConfigError(f"{flag} {machine} is out of range: num_runs is {num_runs}, so use 0..{num_runs - 1}")


def _format_error(e: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see configs/README.md)"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and kind not in ("value_error",):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return ConfigError(f"invalid config {source}:\n" + "\n".join(lines))


def parse_config(data: dict[str, Any], source: str = "") -> Config:
    """Validate a config mapping; any problem becomes one ConfigError listing every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise _format_error(e, source) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file with --config (see configs/)")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}; fix its permissions") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {e.start + 1} is {e.object[e.start : e.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return parse_config(data, str(p))


def resolve_storage(cfg: Config, override: str | None = None, env: dict[str, str] | None = None) -> str:
    """Where a run is stored: --storage, then `storage`, then s3://{bucket} with S3 env, else ./vault."""
    env = dict(os.environ if env is None else env)
    if override:
        return override
    if cfg.storage:
        return cfg.storage
    if env.get("S3_ENDPOINT_URL") or env.get("AWS_ACCESS_KEY_ID"):
        bucket = cfg.data_config.bucket_name or env.get("S3_BUCKET_NAME")
        if not bucket:
            raise ConfigError(
                "S3 credentials are set but no bucket is named: set data_config.bucket_name or S3_BUCKET_NAME, "
                "or pass --storage PATH for the local store"
            )
        return f"s3://{bucket}"
    return "./vault"
