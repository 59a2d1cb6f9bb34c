"""The layout of a run on storage and its records: keys, reading and writing (the schemas are `schemas.py`'s).

```
{run}/cfg.json                            RunRecord: config (no secrets), model, hooks, num_runs
{run}/progress/machine-{i:05d}.json       ProgressRecord: machine i's files, data cursor, statistics
{run}/{hook}/metadata.json                HookMetadata: shape, dtype, rows per file
{run}/{hook}/statistics.json              HookStatistics: the exact merge over finished machines
{run}/{hook}/m{i:05d}-{k:06d}.safetensors machine i's file k, the same name in every hook folder
```
Every record is read through `read_record`: invalid JSON, a wrong type, a missing field or an absurd
value is one FormatError naming the file, the field and the repair. How records are derived and
rebuilt over a run's life is `runs.py`'s. The records of a vault written by the original Activault
(`original.py`) are recognised here and read as what the readers need; they are never written.
The schemas and their builders are imported from here too (`records.RunRecord`): one import for a
run's records.
"""

from __future__ import annotations

import json
import logging
import reprlib
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from activault.errors import ActivaultError, FormatError, NotFoundError
from activault.storage.base import Store, join
from activault.vault import original as orig
from activault.vault.megabatch import SUFFIX
from activault.vault.original import OriginalConfig, OriginalMetadata, OriginalStatistics
from activault.vault.schemas import MAX_COUNT as MAX_COUNT
from activault.vault.schemas import MAX_D as MAX_D
from activault.vault.schemas import MAX_MACHINES as MAX_MACHINES
from activault.vault.schemas import HookMetadata as HookMetadata
from activault.vault.schemas import HookStatistics as HookStatistics
from activault.vault.schemas import ImportSource as ImportSource
from activault.vault.schemas import ProgressCount as ProgressCount
from activault.vault.schemas import ProgressRecord as ProgressRecord
from activault.vault.schemas import Record as Record
from activault.vault.schemas import RunRecord as RunRecord
from activault.vault.schemas import StatsRecord as StatsRecord
from activault.vault.schemas import header_metadata as header_metadata
from activault.vault.schemas import hook_metadata as hook_metadata
from activault.vault.schemas import statistics_record as statistics_record

log = logging.getLogger(__name__)

# A progress record of 10 hooks at d=16384 is ~10 MB; anything far larger is not a record.
MAX_RECORD_BYTES = 64 << 20
FIRST_READ = 1 << 20  # a record's first read; statistics.json of d=16384 is ~1 MB

# The repairs that messages name; each has been checked to do what it says.
REBUILD = (
    "rerun the run's collect command (any one machine, e.g. --machine 0): it rebuilds cfg.json, "
    "metadata.json and statistics.json from the progress records and file headers without "
    "collecting again"
)
REMERGE = "or rewrite statistics.json alone with `activault merge-stats RUN`"
# A repair, or what finds it only once a record has turned out bad (the original's, or ours).
Fix = str | Callable[[], str]


def collect_command(machine: int, repair: bool = False) -> str:
    """The command that collects machine `machine` (again); the config is the one the run used."""
    return f"`activault collect --config <the run's config> --machine {machine}{' --repair' if repair else ''}`"


def redo_machine(run_url: str, machine: int) -> str:
    """The repair of a damaged progress record of `machine`: collect its share again.

    Only the damaged record is deleted: nothing in it can be trusted, and every file it counted is
    rewritten with the same bytes."""
    key = progress_key("", machine)
    return (
        f"delete {run_url.rstrip('/')}/{key} and rerun machine {machine}'s collect command "
        f"({collect_command(machine)}): it collects that machine's share again from the start, "
        "rewriting its files with the same bytes"
    )


def file_repair(run_url: str, name: str) -> str:
    """The repair of a damaged or missing megabatch `name`: collect exactly its machine's bad files again."""
    parsed = parse_file_name(name)
    if parsed is None:
        return "not an activault file name: delete it if it does not belong to the run"
    return (
        f"collect it again with {collect_command(parsed[0], repair=True)}: it collects exactly machine "
        f"{parsed[0]}'s damaged or missing files again, byte-identical, leaving its good files untouched"
    )


# ---- keys ----------------------------------------------------------------------------------------


def cfg_key(run: str) -> str:
    return join(run, "cfg.json")


def progress_key(run: str, machine: int) -> str:
    return join(run, "progress", f"machine-{machine:05d}.json")


def metadata_key(folder: str) -> str:
    """`metadata.json` of a hook folder (`run/hook`, or "" when the store is rooted at it)."""
    return join(folder, "metadata.json")


def statistics_key(folder: str) -> str:
    return join(folder, "statistics.json")


def file_name(machine: int, index: int) -> str:
    """Megabatch file name; the same in every hook folder for the same tokens."""
    return f"m{machine:05d}-{index:06d}{SUFFIX}"


def parse_file_name(name: str) -> tuple[int, int] | None:
    """(machine, index) of one of our file names, else None."""
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith("m") and base.endswith(SUFFIX)):
        return None
    machine, _, index = base[1 : -len(SUFFIX)].partition("-")
    if not (machine.isascii() and machine.isdigit() and index.isascii() and index.isdigit()):
        return None
    return int(machine), int(index)


def parse_progress_name(name: str) -> int | None:
    """The machine of a progress record's file name, else None."""
    base = name.rsplit("/", 1)[-1]
    digits = base.removeprefix("machine-").removesuffix(".json")
    if base == digits or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


R = TypeVar("R", bound=Record)
M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=ProgressCount)


# ---- reading and writing -------------------------------------------------------------------------


def _field_problem(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"])
    where = f"field {field!r}" if field else "the record"
    if err["type"] == "missing":
        return f"{where} is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if not field else f" (got {reprlib.repr(err.get('input'))})"
    return f"{where}: {msg}{got}"


def _fix(fix: Fix) -> str:
    return fix() if callable(fix) else fix


def loads(text: bytes | str) -> Any:
    """`json.loads(text)`, about 3x faster on records of many floats (a progress record holds its
    machine's statistics: ~130 KB at d=2048, read by every reader it lists files for).

    pydantic_core's parser gives the same values (floats bit for bit; `tests/vault/test_records.py`);
    whatever it refuses goes to `json.loads`, which accepts what it accepted before (a lone
    surrogate, a byte order mark) and names the problem in its own words."""
    try:
        return pydantic_core.from_json(text)
    except ValueError:
        return json.loads(text)


def parse_json(text: bytes | str, url: str, fix: Fix) -> dict[str, Any]:
    """A record's JSON object; not JSON, or not an object, is one FormatError naming `url` and `fix`."""
    try:
        obj = loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{url} is not valid JSON ({str(e)[:80]}); {_fix(fix)}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{url} is not a JSON object; {_fix(fix)}")
    return obj


def validate(obj: dict[str, Any], model: type[M], url: str, fix: Fix) -> M:
    """`obj` as a `model`; any problem is one FormatError naming `url`, the field and `fix`."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise FormatError(f"{url}: {_field_problem(e)}; {_fix(fix)}") from None


def parse_record(text: bytes | str, model: type[R], url: str, fix: Fix) -> R:
    """A record from its JSON text; any problem is one FormatError naming `url`, the field and `fix`."""
    return validate(parse_json(text, url, fix), model, url, fix)


def read_record(store: Store, key: str, model: type[R], fix: Fix, size: int | None = None) -> R | None:
    """A typed record, or None if absent.

    Args:
        fix: the repair a message names (a callable: found only when the record is bad).
        size: the object's size from a listing (else the store is asked first).
    """
    obj = read_json(store, key, fix, size)
    return None if obj is None else validate(obj, model, store.url(key), fix)


def read_json(store: Store, key: str, fix: Fix, size: int | None = None) -> dict[str, Any] | None:
    """A record's JSON object, read with one bounded read, or None if absent."""
    data = read_bytes(store, key, fix, size)
    return None if data is None else parse_json(data, store.url(key), fix)


def read_bytes(store: Store, key: str, fix: Fix, size: int | None = None) -> bytes | None:
    """A record's bytes, read with one bounded read, or None if absent."""
    url = store.url(key)
    if size is not None and size > MAX_RECORD_BYTES:
        raise FormatError(f"{url} is {size} bytes, far more than a record holds; {_fix(fix)}")
    try:
        # One bounded ranged read, not a HEAD first: public buckets refuse HEAD of a missing key
        # (403) where GET says 404, and a huge object costs no more than the bound.
        if size is not None:
            data = store.get(key)
        else:  # records are KBs: one small read, a second one only for a big (or hostile) object
            data = store.get_range(key, 0, FIRST_READ)
            if data.nbytes == FIRST_READ:
                data = store.get_range(key, 0, MAX_RECORD_BYTES + 1)
    except NotFoundError:
        return None
    if data.nbytes > MAX_RECORD_BYTES:
        raise FormatError(f"{url} is over {MAX_RECORD_BYTES} bytes, far more than a record holds; {_fix(fix)}")
    return bytes(data)


def write_record(store: Store, key: str, record: Record) -> None:
    """Sorted keys, floats in their shortest exact form: equal records are equal bytes.

    A record read from an original vault is never written back (ConfigError): activault does not
    write into such a vault."""
    if getattr(record, "original", None) is not None:
        raise orig.refuse_write(store.url(key).rsplit("/", 1)[0])
    unset = {name for name in record.omit_unset if getattr(record, name) is None}
    store.put_text(key, record_text(record.model_dump(exclude=unset)))


def record_text(fields: dict[str, Any]) -> str:
    """One top-level field per line, each value on its line. Not `indent=`: that takes Python's
    pure-Python encoder, 3.4 ms for a progress record's 3,072 floats, on the collector's commit
    thread once per file (its CPU is taken from the forward pass on a CPU collection)."""
    lines = (f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(fields.items()))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def read_run(store: Store, run: str, *, original_ok: bool = False) -> RunRecord | None:
    """The run's cfg.json. The original Activault's is a ConfigError (nothing may write into its
    vault), unless `original_ok`: then it is read as a RunRecord with `original` set."""
    key = cfg_key(run)
    fix = partial(_fix_of, orig.is_original_run, store, run, orig.CONFIG_FIX, REBUILD)
    obj = read_json(store, key, fix)
    if obj is None or not orig.is_config(obj):
        return None if obj is None else validate(obj, RunRecord, store.url(key), fix)
    if not original_ok:
        raise orig.refuse_write(store.url(run))
    cfg = validate(obj, OriginalConfig, store.url(key), orig.CONFIG_FIX)
    return validate(orig.run_fields(cfg, obj), RunRecord, store.url(key), orig.CONFIG_FIX)


def read_progress(
    store: Store, run: str, machine: int, size: int | None = None, plan: RunRecord | None = None
) -> ProgressRecord | None:
    """Machine `machine`'s progress record; with `plan` (cfg.json), one that counts more files than
    the machine's planned share is a FormatError too (`check_against_plan`)."""
    fix = redo_machine(store.url(run), machine)
    rec = read_record(store, progress_key(run, machine), ProgressRecord, fix, size)
    return _checked_progress(rec, store, run, machine, plan)


def read_progress_count(
    store: Store, run: str, machine: int, size: int | None = None, plan: RunRecord | None = None
) -> ProgressCount | None:
    """What a reader lists files by in machine `machine`'s progress record (files done, finished),
    checked as `read_progress` checks it; its statistics are skipped, not parsed (a record holds
    3 x d_model floats per hook: 0.4 ms a record at d=2048, a third of reader construction).
    Whoever uses the statistics (statistics.json, verify, resume) reads the whole record. A record
    the fast parse refuses is read whole, so its error is the one `read_progress` gives."""
    fix = redo_machine(store.url(run), machine)
    key = progress_key(run, machine)
    data = read_bytes(store, key, fix, size)
    if data is None:
        return None
    try:
        rec: ProgressCount = ProgressCount.model_validate_json(data)
    except ValidationError:  # named by the whole record's parse (or accepted there: a byte order mark)
        rec = validate(parse_json(data, store.url(key), fix), ProgressRecord, store.url(key), fix)
    return _checked_progress(rec, store, run, machine, plan)


def _checked_progress(rec: P | None, store: Store, run: str, machine: int, plan: RunRecord | None) -> P | None:
    """`rec`, once its machine is the one its name gives and (with `plan`) it counts no more files
    than that machine's planned share; else a FormatError."""
    fix = redo_machine(store.url(run), machine)
    if rec is not None and rec.machine != machine:
        raise FormatError(
            f"{store.url(progress_key(run, machine))}: field 'machine' is {rec.machine}, the name says {machine}; {fix}"
        )
    if rec is not None and plan is not None:
        check_against_plan(rec, planned_files(plan, machine), store, run)
    return rec


def planned_files(run: RunRecord, machine: int) -> int | None:
    """The files machine `machine` writes at most, from cfg.json's copy of the config (n_batches
    shared among num_runs machines, batches_per_upload per file: `Config.machine_files`); None
    when cfg.json holds no config (the original Activault's, or a record built by hand)."""
    data, upload = run.config.get("data_config"), run.config.get("upload_config")
    if not isinstance(data, dict) or not isinstance(upload, dict):
        return None
    n, per = data.get("n_batches"), upload.get("batches_per_upload")
    if type(n) is not int or type(per) is not int or n <= 0 or per <= 0:
        return None
    batches = n // run.num_runs + (1 if machine < n % run.num_runs else 0)
    return -(-batches // per)


def check_against_plan(record: ProgressCount, planned: int | None, store: Store, run: str) -> None:
    """A FormatError when `record` counts more files than its machine's `planned` share (None: no
    plan to check against): such a record is damaged, whatever files are there."""
    if planned is None or record.files_done <= planned:
        return
    m = record.machine
    raise FormatError(
        f"{store.url(progress_key(run, m))}: field 'files_done' is {record.files_done}, more than the "
        f"{planned} file(s) machine {m} is planned to write (cfg.json: n_batches, batches_per_upload, "
        f"num_runs): the record is damaged; {redo_machine(store.url(run), m)}"
    )


def read_metadata(store: Store, folder: str) -> HookMetadata | None:
    """A hook folder's metadata.json (`folder` is `run/hook`, or "" at a hook folder's root).

    The original Activault's is read as what it says of the files (`original` set): shape, dtype
    (`"torch.float16"`), rows per file; any problem with it names the file and never `collect`.
    """
    key = metadata_key(folder)
    url = store.url(key)
    fix = partial(_fix_of, orig.holds_original_files, store, folder, orig.METADATA_FIX, REBUILD)
    obj = read_json(store, key, fix)
    if obj is None or not orig.is_metadata(obj):
        return None if obj is None else validate(obj, HookMetadata, url, fix)
    meta = validate(obj, OriginalMetadata, url, orig.METADATA_FIX)
    return validate(orig.hook_fields(meta), HookMetadata, url, orig.METADATA_FIX)


def read_statistics(store: Store, folder: str) -> HookStatistics | None:
    """A hook folder's statistics.json: exact. The original Activault's are not, and are refused
    with why (FormatError); `read_original_statistics` reads them to show as what they are."""
    key = statistics_key(folder)
    fix = _statistics_fix(store, folder)
    obj = read_json(store, key, fix)
    if obj is not None and orig.is_statistics(obj):
        raise FormatError(f"{store.url(key)} holds {orig.STATISTICS_FIX}")
    return None if obj is None else validate(obj, HookStatistics, store.url(key), fix)


def read_original_statistics(store: Store, folder: str) -> OriginalStatistics | None:
    """The original Activault's statistics.json, as it wrote it; None if absent or activault's."""
    key = statistics_key(folder)
    obj = read_json(store, key, _statistics_fix(store, folder))
    if obj is None or not orig.is_statistics(obj):
        return None
    return validate(obj, OriginalStatistics, store.url(key), orig.STATISTICS_DAMAGED_FIX)


def _statistics_fix(store: Store, folder: str) -> Fix:
    ours = f"{REBUILD}, {REMERGE}"
    return partial(_fix_of, orig.holds_original_files, store, folder, orig.STATISTICS_DAMAGED_FIX, ours)


def _fix_of(is_original: Callable[[Store, str], bool], store: Store, key: str, original: str, ours: str) -> str:
    """The repair of a bad record under `key`: the original Activault's vault's, or ours."""
    try:
        return original if is_original(store, key) else ours
    except ActivaultError:  # the folder cannot be listed: the record's own problem is what to report
        return ours
