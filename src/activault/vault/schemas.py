"""The run's records as typed schemas (pydantic, strict), and the builders of the ones a writer makes.

`records.py` reads and writes them; a bad record is one FormatError naming the file, the field and
the repair.
"""

from __future__ import annotations

import reprlib
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from activault import dtypes
from activault.vault import codec as codecs
from activault.vault.megabatch import DOCUMENTS, FORMAT, FORMAT_VERSION, PROVENANCE_SINCE, SUFFIX, Header
from activault.vault.norms import NORMS
from activault.vault.original import OriginalConfig, OriginalMetadata
from activault.vault.stats import NORM_HIST_LENGTH, STATS_VERSION, RunningStats

if TYPE_CHECKING:
    from typing_extensions import Self

# File names hold five digits of machine index, so that names sort by machine.
MAX_MACHINES = 100_000
MAX_COUNT = 1 << 62
MAX_D = 1 << 20

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Positive = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Floats = Annotated[list[float], Field(fail_fast=True)]
StateDtype = Literal["float64", "float32", "float16", "bfloat16"]


class Record(BaseModel):
    """Strict: a string is not a number, a float not an int; unknown keys are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    # Optional fields added after a record's first version: left out while unset, so a record
    # without them keeps the bytes it had.
    omit_unset: ClassVar[tuple[str, ...]] = ()


class Versioned(Record):
    format: Literal["activault"] = FORMAT
    format_version: int = Field(default=FORMAT_VERSION, ge=1)

    @model_validator(mode="after")
    def _not_newer(self) -> Versioned:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is newer than this activault reads "
                f"({FORMAT_VERSION}); upgrade activault"
            )
        return self


class ImportSource(Record):
    """Where an imported run's rows came from: an import resumes only from the same source."""

    format: str
    path: str
    fingerprint: str
    rows: Count
    documents: str
    packing: str = "unknown"
    """How the source packed documents into rows: "unknown" (SAELens packs contexts), or as collected."""
    cross_document_attention: str = "unknown"
    """Whether a row's documents attended to each other: "unknown", or "none" (a collection's export)."""

    def provenance(self) -> str:
        """One line for inspect and verify: where the rows came from, and what that means."""
        line = (
            f"imported from {self.format} at {self.path}: packing {self.packing}, "
            f"cross-document attention {self.cross_document_attention}"
        )
        if self.cross_document_attention != "none":
            line += (
                "; a row may hold documents that attended to each other, so a token's activations may "
                "depend on what it was packed with (a collection's never do)"
            )
        return line


class RunRecord(Versioned):
    """cfg.json: what the run is; written by every machine at start, the same bytes from each."""

    omit_unset = ("aligned_to", "imported_from", "original", "source")

    activault_version: str = ""
    run_name: str = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None
    hooks: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    hook_dims: dict[str, Annotated[int, Field(gt=0, le=MAX_D)]] = Field(default_factory=dict)
    num_runs: int = Field(ge=1, le=MAX_MACHINES)
    progress: list[str] = Field(default_factory=list)
    source: dict[str, Any] | None = None
    """The text source its documents came from, resolved (path, name, split, data_files, columns):
    what `activault context` reads again. Unset in runs collected before provenance, and imports."""
    aligned_to: str | None = None
    """Set by a collection with `data_config.align_to`: the run (its URL) whose documents, packing and
    token order this run shares, file for file."""
    imported_from: ImportSource | None = None
    """Set by `activault import`: the run holds a SAELens cache's rows, not a collection's."""
    original: OriginalConfig | None = None
    """Set when read from the original Activault's cfg.json (`read_run(original_ok=True)`)."""

    @model_validator(mode="after")
    def _hooks(self) -> RunRecord:
        if len(set(self.hooks)) != len(self.hooks) or any("/" in h for h in self.hooks):
            raise ValueError(f"hooks {reprlib.repr(self.hooks)} repeat a name or hold a '/'")
        return self


class StatsRecord(Record):
    """`RunningStats.to_dict()`: enough to merge exactly (count, mean, m2, norm sums)."""

    stats_version: int = Field(default=STATS_VERSION, ge=1, le=STATS_VERSION)
    count: Count
    d_model: int = Field(gt=0, le=MAX_D)
    mean: Floats
    std: Floats
    m2: Floats
    norm: float
    norm_sum: float
    norm_sq_sum: float = 0.0
    nonfinite: Count = 0
    # Left out while None (in progress records too): a record without it keeps its bytes.
    norm_hist: list[Count] | None = Field(default=None, exclude_if=lambda v: v is None)
    """stats_version 3: finite tokens per L2-norm bin (vault/stats.py has the bins)."""

    @model_validator(mode="after")
    def _lengths(self) -> StatsRecord:
        for name in ("mean", "std", "m2"):
            n = len(getattr(self, name))
            if n != self.d_model:
                raise ValueError(f"{name} has {n} values, d_model is {self.d_model}")
        if self.norm_hist is not None and (len(self.norm_hist), sum(self.norm_hist)) != (NORM_HIST_LENGTH, self.count):
            raise ValueError(
                f"norm_hist has {len(self.norm_hist)} bins counting {sum(self.norm_hist)} tokens, not "
                f"{NORM_HIST_LENGTH} bins counting count={self.count}"
            )
        # NaN passes: version 1 records counted tokens with NaN or Inf in (readers refuse to
        # normalise with them, `activault merge-stats` recounts them).
        if any(v < 0 for v in self.m2) or any(v < 0 for v in self.std) or self.norm_sum < 0:
            raise ValueError("a variance or norm is negative")
        return self

    def running(self, device: str = "cpu") -> RunningStats:
        return RunningStats.from_dict(self.model_dump(), device)


class HookStatistics(StatsRecord):
    """{hook}/statistics.json: the merge over finished machines, and which machines those are."""

    machines: list[Annotated[int, Field(ge=0, lt=MAX_MACHINES)]] = Field(min_length=1)
    num_runs: int = Field(ge=1, le=MAX_MACHINES)

    @model_validator(mode="before")
    @classmethod
    def _some_token(cls, data: Any) -> Any:
        """count 0 only when every token held NaN or Inf; named before the other fields' problems."""
        if isinstance(data, dict) and data.get("count") == 0 and not data.get("nonfinite"):
            msg = "Input should be greater than 0 (0 only when nonfinite > 0: every token held NaN or Inf)"
            err = InitErrorDetails(type=PydanticCustomError("greater_than", msg), loc=("count",), input=0)
            raise ValidationError.from_exception_data(cls.__name__, [err])
        return data

    @model_validator(mode="after")
    def _machines(self) -> HookStatistics:
        if self.machines != sorted(set(self.machines)) or self.machines[-1] >= self.num_runs:
            raise ValueError(f"machines {reprlib.repr(self.machines)} are not distinct in 0..num_runs-1")
        return self


class ProgressCount(Record):
    """The fields of a progress record a reader lists files by (records.read_progress_count)."""

    machine: int = Field(ge=0, lt=MAX_MACHINES)
    num_runs: int = Field(ge=1, le=MAX_MACHINES)
    files_done: Count = 0
    finished: bool = False

    @model_validator(mode="after")
    def _machine(self) -> Self:
        if self.machine >= self.num_runs:
            raise ValueError(f"machine {self.machine} is not below num_runs {self.num_runs}")
        return self


class ProgressRecord(ProgressCount):
    """progress/machine-{i}.json: how far machine i got; written after the files it counts."""

    rows_done: Count = 0
    tokens_done: Count = 0
    data_state: dict[str, Any] | None = None
    stats: dict[str, StatsRecord] = Field(default_factory=dict)


class HookMetadata(Versioned):
    """{hook}/metadata.json: what every file of the hook holds."""

    omit_unset = ("original",)

    run_name: str = ""
    hook: str = ""
    model: str = ""
    shape: list[int] = Field(min_length=3, max_length=3)
    dtype: StateDtype
    d_model: int = Field(gt=0, le=MAX_D)
    seq_length: int = Field(gt=0, le=MAX_D)
    batch_size: Positive
    batches_per_upload: Positive
    rows_per_file: Positive
    bytes_per_file: Positive
    tensors: dict[str, Any] = Field(default_factory=dict)
    file_pattern: str = "m{machine:05d}-{index:06d}" + SUFFIX
    compression: dict[str, Any] = Field(default_factory=lambda: {"codec": "none"})
    """How new files are written (vault/codec.py `describe`); each file's header says how it is."""
    original: OriginalMetadata | None = None
    """Set when read from the original Activault's metadata.json (its files are `.pt`)."""

    @model_validator(mode="after")
    def _consistent(self) -> HookMetadata:
        if self.shape != [self.rows_per_file, self.seq_length, self.d_model]:
            raise ValueError(f"shape {self.shape} is not [rows_per_file, seq_length, d_model]")
        if self.rows_per_file != self.batch_size * self.batches_per_upload:
            raise ValueError("rows_per_file is not batch_size * batches_per_upload")
        if (problem := codecs.description_problem(self.compression)) is not None:
            raise ValueError(problem)
        return self

    def disagreement(self, header: Header) -> str | None:
        """How a file's header contradicts this metadata, or None when it fits."""
        if (
            (header.seq_len, header.d_model) != (self.seq_length, self.d_model)
            or dtypes.name(header.dtype) != self.dtype
            or header.rows > self.rows_per_file
        ):
            return (
                f"metadata.json says [rows <= {self.rows_per_file}, {self.seq_length}, "
                f"{self.d_model}] {self.dtype}, the file holds [{header.rows}, {header.seq_len}, "
                f"{header.d_model}] {dtypes.name(header.dtype)}"
            )
        return None


def header_metadata(
    run_name: str, hook: str, machine: int, index: int, model: str, provenance: bool = False
) -> dict[str, str]:
    """The `__metadata__` of a megabatch header (encode adds the checksums); `provenance`: the file
    holds `documents` (else it is labelled with the last version without them)."""
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if provenance else PROVENANCE_SINCE - 1),
        "run_name": run_name,
        "hook": hook,
        "machine": str(machine),
        "file_index": str(index),
        "model": model,
    }


def hook_metadata(
    *,
    run_name: str,
    hook: str,
    d_model: int,
    dtype: Any,
    seq_length: int,
    rows_per_file: int,
    batch_size: int,
    batches_per_upload: int,
    model: str,
    compression: codecs.Codec | None = None,
    provenance: bool = False,
    norms: bool = True,
) -> HookMetadata:
    """The contents of `{run}/{hook}/metadata.json`; `dtype` a torch.dtype or its name;
    `provenance`: its files hold `documents` (int64, 8 bytes a token more); `norms`: they hold each
    token's norm (float32, 4 bytes more: every file written since format 5)."""
    name = dtype if isinstance(dtype, str) else dtypes.name(dtype)
    itemsize = dtypes.to_torch(name).itemsize
    tensors: dict[str, Any] = {
        "states": {"dtype": name, "shape": ["rows", seq_length, d_model]},
        "input_ids": {"dtype": "int32", "shape": ["rows", seq_length]},
        "positions": {"dtype": "int32", "shape": ["rows", seq_length]},
    }
    if provenance:
        tensors[DOCUMENTS] = {"dtype": "int64", "shape": ["rows", seq_length]}
    if norms:
        tensors[NORMS] = {"dtype": "float32", "shape": ["rows", seq_length]}
    return HookMetadata(
        run_name=run_name,
        hook=hook,
        model=model,
        shape=[rows_per_file, seq_length, d_model],
        dtype=name,  # type: ignore[arg-type]  # validated by the model
        d_model=d_model,
        seq_length=seq_length,
        batch_size=batch_size,
        batches_per_upload=batches_per_upload,
        rows_per_file=rows_per_file,
        bytes_per_file=rows_per_file * seq_length * (d_model * itemsize + 8 + 8 * provenance + 4 * norms),
        tensors=tensors,
        compression=codecs.describe(compression),
    )


def statistics_record(total: RunningStats, machines: list[int], num_runs: int) -> HookStatistics:
    # Built from our own computation: validated already by construction, so skip the pass over d floats.
    d = total.to_dict()
    return HookStatistics.model_construct(**d, machines=machines, num_runs=num_runs)
