"""SAELens's cached-activation layout, as its `CacheActivationsRunner` writes it, read and written.

An HF `datasets` folder (`datasets.load_from_disk` reads it): one row per sequence, one
`Array2D((context_size, d_in), dtype)` column per hook, named by the hook, and `token_ids` as a
fixed-length list of int32; `data-{i:05d}-of-{n:05d}.arrow` files (Arrow IPC streams),
`dataset_info.json`, and `state.json` with the dataset's fingerprint. `activault.json` beside them
(ignored by SAELens and datasets) records what an export came from.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activault import dtypes
from activault.config import name_problem
from activault.errors import ConfigError, FormatError, NotFoundError, shown

SIDECAR = "activault.json"
TOKEN_IDS, POSITIONS = "token_ids", "positions"
ARROW_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64"}


def features(
    columns: Mapping[str, str],
    seq: int,
    d: Mapping[str, int],
    dtypes: Mapping[str, str],
    positions: bool,
):
    from datasets import Array2D, Features, Sequence, Value

    feats: dict[str, Any] = {columns[h]: Array2D(shape=(seq, d[h]), dtype=dtypes[h]) for h in columns}
    feats[TOKEN_IDS] = Sequence(Value(dtype="int32"), length=seq)
    if positions:
        feats[POSITIONS] = Sequence(Value(dtype="int32"), length=seq)
    return Features(feats)


def arrow_2d(ftype: Any, x: torch.Tensor) -> Any:
    """`x: [rows, seq, d]` as an Array2D extension array, sharing x's memory (no copy)."""
    import pyarrow as pa

    rows, seq, d = x.shape
    values = pa.array(x.reshape(-1).numpy())
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * seq * d + 1, d, dtype=np.int32)), values)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * seq + 1, seq, dtype=np.int32)), inner)
    return pa.ExtensionArray.from_storage(ftype, outer)


def arrow_ids(x: torch.Tensor) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).to(torch.int32).numpy()), x.shape[1])


def finish_dataset(tmp: Path, files: list[str], feats: Any, fingerprint: str) -> None:
    """Name the Arrow files and write state.json and dataset_info.json as SAELens's consolidation
    does; `fingerprint` is a hash of the content (datasets' own hashes paths and mtimes, so two
    exports of the same rows would differ)."""
    from datasets import DatasetInfo
    from datasets.utils.py_utils import asdict

    n = len(files)
    final = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    for a, b in zip(files, final, strict=True):
        os.rename(tmp / a, tmp / b)
    info = asdict(DatasetInfo(features=feats))
    (tmp / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
    state: dict[str, Any] = {
        "_data_files": [{"filename": f} for f in final],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2))


@dataclass
class CachedActivations:
    """A SAELens cache opened for import: its table, columns -> hooks, widths and dtypes."""

    path: Path
    table: Any  # pyarrow Table, memory-mapped
    fingerprint: str
    hooks: dict[str, str]  # column -> hook
    dims: dict[str, int]  # column -> d
    source_dtypes: dict[str, torch.dtype]  # column -> dtype in the cache
    stored_dtypes: dict[str, torch.dtype]  # column -> dtype to store
    seq: int
    positions: bool
    padding: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # row -> [first, stop) of padding
    provenance: dict[str, str] = field(default_factory=dict)  # packing, cross_document_attention, if known


def open_cache(
    cache_dir: str | Path,
    hooks: Sequence[str] | Mapping[str, str] | None,
    dtype: str | torch.dtype | None,
) -> CachedActivations:
    from datasets import Array2D, Dataset, load_from_disk

    path = Path(cache_dir).expanduser().absolute()
    if not os.path.lexists(path / "state.json"):
        raise NotFoundError(
            f"{path} is not a saved HF dataset (no state.json): pass the folder SAELens's "
            "CacheActivationsRunner wrote (its cached_activations_path)"
        )
    files = data_files(path)
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        what = f"{type(e).__name__}: {str(e)[:300]}"
        if "External features info" in str(e) or "dataset_info.json" in str(e):
            raise FormatError(
                f"{path / 'dataset_info.json'} does not describe the Arrow files ({what}); {REMAKE}"
            ) from None
        raise FormatError(f"{path}: cannot be loaded with datasets.load_from_disk ({what}); {REMAKE}") from None
    if not isinstance(ds, Dataset):
        raise ConfigError(f"{path} holds several splits ({list(ds)}): pass one split's folder")
    arrays = {c: f for c, f in ds.features.items() if isinstance(f, Array2D)}
    if TOKEN_IDS not in ds.features:
        raise FormatError(
            f"{path} has no {TOKEN_IDS!r} column: a vault keeps every token's id; re-cache it with a "
            "SAELens version that writes token ids"
        )
    side_cols = read_sidecar(path)
    if hooks is None:
        mapping = {c: side_cols.get(c, {}).get("hook", c) for c in arrays}
    elif isinstance(hooks, Mapping):
        mapping = dict(hooks)
    else:
        mapping = {c: side_cols.get(c, {}).get("hook", c) for c in hooks}
    missing = [c for c in mapping if c not in arrays]
    if missing or not mapping:
        raise ConfigError(f"{path}: no activation column {missing or ''}; its activation columns are {sorted(arrays)}")
    for c, h in mapping.items():
        if problem := name_problem(h):
            raise ConfigError(
                f"{path}: hook name {shown(h)} (of column {c!r}) is not {problem}; name it with "
                "hooks={column: hook} (--hook COLUMN=HOOK)"
            )
    shapes = {tuple(arrays[c].shape) for c in mapping}
    seq = next(iter(shapes))[0]
    lists = {c: list_length(ds.features[c]) for c in (TOKEN_IDS, POSITIONS) if c in ds.features}
    if len({s[0] for s in shapes}) != 1 or any(n != seq for n in lists.values()):
        raise FormatError(
            f"{path}: columns disagree on the context size ({sorted(shapes)}, "
            f"{', '.join(f'{c} {n}' for c, n in lists.items())}); {REMAKE}"
        )
    if not all(isinstance(n, int) and n > 0 for s in shapes for n in s):  # was: ZeroDivisionError
        raise FormatError(f"{path}: activation columns of shape {sorted(shapes)} hold no values; {REMAKE}")
    source = {c: torch_dtype(arrays[c].dtype, path) for c in mapping}
    stored = {}
    for c in mapping:
        want = dtype or side_cols.get(c, {}).get("dtype") or source[c]
        stored[c] = torch_dtype(want if isinstance(want, str) else dtypes.name(want), path)
        if dtypes.canonical(dtypes.name(stored[c])) is None:  # was: an "invalid config" error
            raise ConfigError(
                f"{path}: column {c!r} would be stored as {dtypes.name(stored[c])}, which activault does not "
                "store (float32, float16, bfloat16): pass dtype='float32' (--dtype float32)"
            )
    fingerprint = str(_json_object(path / "state.json").get("_fingerprint"))
    cache = CachedActivations(
        path,
        ds.data.table,
        fingerprint,
        mapping,
        {c: int(arrays[c].shape[1]) for c in mapping},
        source,
        stored,
        int(seq),
        POSITIONS in ds.features,
        provenance=read_provenance(path),
    )
    if files is not None:
        check_rows(cache, files)
    # After the rows: padding past a truncated file's rows is the file's fault, not the sidecar's.
    cache.padding = read_padding(path, ds.num_rows, int(seq))
    return cache


REMAKE = "re-create the cache (SAELens's CacheActivationsRunner, or `activault export`)"


def _regular(file: Path) -> Path:
    """`file`, once it is a regular file (a link to one too): a FIFO or device is never opened (a
    FIFO would block the reader forever)."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise NotFoundError(f"{file} does not exist: the cache is incomplete; {REMAKE}") from None
    except OSError as e:
        raise FormatError(f"{file} cannot be read ({e.strerror}); {REMAKE}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a file"
        raise FormatError(f"{file} is {kind}, not a regular file: it is not opened; {REMAKE}")
    return file


def _json_object(file: Path, fix: str = REMAKE) -> dict[str, Any]:
    """A JSON object file of the cache; anything else is one FormatError naming it and `fix`."""
    try:
        obj = json.loads(_regular(file).read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{file} is not valid JSON ({str(e)[:80]}); {fix}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{file} is a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def data_files(path: Path) -> list[Path] | None:
    """The Arrow files state.json lists, in order, each checked a regular file before datasets
    opens any; None for a folder of several splits (refused once loaded)."""
    info = path / "dataset_info.json"
    if not os.path.lexists(info) and os.path.lexists(path / "dataset_dict.json"):
        return None
    _json_object(info)
    listed = _json_object(path / "state.json").get("_data_files")
    if listed == []:  # as `datasets` saves no rows (was: state.json called damaged, the cache re-created)
        raise ConfigError(f"{path} holds no rows (its state.json lists no Arrow files): there is nothing to import")
    names = [f.get("filename") if isinstance(f, dict) else None for f in listed] if isinstance(listed, list) else []
    if not names or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        raise FormatError(
            f"{path / 'state.json'}: field '_data_files' is {reprlib.repr(listed)}, not a list of "
            f"{{'filename': NAME}} of files in the folder; {REMAKE}"
        )
    return [_regular(path / str(n)) for n in names]


def check_rows(cache: CachedActivations, files: list[Path]) -> None:
    """Every row of every imported column holds what dataset_info.json says (seq tokens of d
    values, no nulls), checked from the Arrow list offsets before any file is written: the import
    views the flat values as [rows, seq, d], so a row of another length would misalign every row
    after it with its token ids. Each file ends its stream, and its token ids and positions fit
    the vault's int32. An error names the Arrow file and the row."""
    import pyarrow as pa

    lengths: dict[str, tuple[int, ...]] = {c: (cache.seq, d) for c, d in cache.dims.items()}
    lengths[TOKEN_IDS] = (cache.seq,)
    if cache.positions:
        lengths[POSITIONS] = (cache.seq,)
    first = 0
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                rows = pa.ipc.open_stream(source).read_all().num_rows
                ended = _ends_stream(source)
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"{file} is not an Arrow stream ({str(e)[:80]}); {REMAKE}") from None
        if not ended:  # was: a file cut between record batches imported without its last rows
            raise FormatError(
                f"{file}: its Arrow stream stops after {rows} rows without its end marker: the file is "
                f"truncated and rows after them are lost; {REMAKE}"
            )
        for c, want in lengths.items():
            _check_column(file, c, cache.table.column(c).slice(first, rows), want)
        first += rows
    if first != cache.table.num_rows:
        raise FormatError(f"{cache.path}: its Arrow files hold {first} rows, the dataset {cache.table.num_rows}")


def _ends_stream(source: Any) -> bool:
    """Whether the Arrow stream in `source` ends with its end-of-stream marker after its last
    message, as every writer closes it; a stream cut between record batches reads as whole without."""
    import pyarrow as pa

    source.seek(0)
    end = 0
    for _ in pa.ipc.MessageReader.open_stream(source):
        end = source.tell()
    source.seek(end)
    marker = source.read(8)
    return marker == b"\xff\xff\xff\xff\x00\x00\x00\x00" or marker[:4] == b"\x00\x00\x00\x00"  # or pre-1.0


BOUNDS = {TOKEN_IDS: (0, 2**31 - 1), POSITIONS: (-1, 2**31 - 1)}  # as the vault's int32 can hold them


def _check_values(file: Path, name: str, values: Any, start: int, per: int) -> None:
    """A file's token ids (from 0) or positions (-1 for padding, else from 0) as integers the vault's
    int32 holds: was wrapped or truncated to other ids silently (an int64 2**40 + 5 stored as 5)."""
    import pyarrow as pa

    lo, hi = BOUNDS[name]
    what = "token ids" if name == TOKEN_IDS else "positions (-1 for padding)"
    if not pa.types.is_integer(values.type):
        raise FormatError(f"{file}: column {name!r} holds {values.type} values, not integer {what}; {REMAKE}")
    x = values.to_numpy()
    bad = np.flatnonzero((x > hi) if x.dtype.kind == "u" else (x < lo) | (x > hi))
    if bad.size:
        i = int(bad[0])
        raise FormatError(
            f"{file}: row {start + i // per}, token {i % per}, of column {name!r} is {int(x[i])}, not one of "
            f"the {what} from {lo} to {hi} a vault stores; {REMAKE}"
        )


def _check_column(file: Path, name: str, column: Any, lengths: tuple[int, ...]) -> None:
    """One file's rows of a column: `lengths` lists per row at each level, then values; no nulls."""
    import pyarrow as pa

    start = 0  # the chunk's first row in the file
    for chunk in column.chunks:
        arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        per = 1  # items of this level per row
        for level, want in enumerate([*lengths, None]):
            unit = "tokens" if level == 0 else "values per token"
            if arr.null_count:
                i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]) // per
                raise FormatError(
                    f"{file}: row {start + i} of column {name!r} is null or holds nulls: it cannot be "
                    f"imported; {REMAKE}"
                )
            if want is None:
                if name in BOUNDS:
                    _check_values(file, name, arr, start, per)
                break
            if pa.types.is_fixed_size_list(arr.type):
                got = np.full(1, arr.type.list_size) if len(arr) else np.zeros(0, int)
            elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                got = np.diff(arr.offsets.to_numpy())
            else:
                raise FormatError(f"{file}: column {name!r} holds {arr.type}, not lists of {unit}; {REMAKE}")
            bad = np.flatnonzero(got != want)
            if bad.size:
                i = int(bad[0])
                where = f"row {start + i // per}" + (f", token {i % per}," if level else "")
                raise FormatError(
                    f"{file}: {where} of column {name!r} holds {int(got[i])} {unit}, dataset_info.json says "
                    f"{want}: the rows would be misaligned with their token ids; {REMAKE}"
                )
            arr = arr.flatten()
            per *= want
        start += len(chunk)


SIDECAR_FIX = (
    "repair it, or delete it: it only records what an export came from, and without it columns "
    "are imported under their own names, in the cache's dtypes (or as the hooks and dtype given), "
    "and padding tokens as real ones"
)


def read_sidecar(path: Path) -> dict[str, dict[str, str]]:
    """The columns `activault.json` records ({column: {"hook", "dtype"}}, each optional), {} without
    one; a damaged one is one FormatError naming it, the field and the repair."""
    file = path / SIDECAR
    if not os.path.lexists(file):
        return {}
    fix = SIDECAR_FIX
    side = _json_object(file, fix)
    columns = side.get("columns", {})
    if not isinstance(columns, dict):
        raise FormatError(f"{file}: field 'columns' is {reprlib.repr(columns)}, not an object of columns; {fix}")
    out: dict[str, dict[str, str]] = {}
    for column, entry in columns.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{file}: columns.{column} is {reprlib.repr(entry)}, not an object; {fix}")
        out[column] = {}
        for key in ("hook", "dtype"):
            value = entry.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise FormatError(f"{file}: columns.{column}.{key} is {reprlib.repr(value)}, not a name; {fix}")
            if key == "hook" and (problem := name_problem(value)):
                raise FormatError(f"{file}: columns.{column}.hook {shown(value)} is not {problem}; {fix}")
            if key == "dtype" and _float_dtype(value) is None:
                raise FormatError(
                    f"{file}: columns.{column}.dtype {reprlib.repr(value)} is not a float type activault stores; {fix}"
                )
            out[column][key] = value
    return out


def read_padding(path: Path, rows: int, seq: int) -> dict[int, list[tuple[int, int]]]:
    """The padding `activault.json` lists ({row: [(first, stop), ...]}), {} without it; an entry
    outside the cache's rows and tokens is one FormatError naming it and the repair."""
    file = path / SIDECAR
    if not os.path.lexists(file):
        return {}
    listed = _json_object(file, SIDECAR_FIX).get("padding", [])
    if not isinstance(listed, list):
        raise FormatError(f"{file}: field 'padding' is {reprlib.repr(listed)}, not a list; {SIDECAR_FIX}")
    out: dict[int, list[tuple[int, int]]] = {}
    for i, entry in enumerate(listed):
        ok = isinstance(entry, list) and len(entry) == 3 and all(type(x) is int for x in entry)
        if not ok or not (0 <= entry[0] < rows and 0 <= entry[1] < entry[2] <= seq):
            raise FormatError(
                f"{file}: padding[{i}] is {reprlib.repr(entry)}, not [row, first, stop) with row < {rows} "
                f"and first < stop <= {seq}; {SIDECAR_FIX}"
            )
        out.setdefault(entry[0], []).append((entry[1], entry[2]))
    return out


def read_provenance(path: Path) -> dict[str, str]:
    """What an export's `activault.json` says of how its rows were made ({"packing",
    "cross_document_attention"}), {} without it; a damaged entry is one FormatError naming it."""
    file = path / SIDECAR
    if not os.path.lexists(file):
        return {}
    found = _json_object(file, SIDECAR_FIX).get("provenance", {})
    keys = ("packing", "cross_document_attention")
    if not isinstance(found, dict) or not all(isinstance(found.get(k, ""), str) for k in keys):
        raise FormatError(
            f"{file}: field 'provenance' is {reprlib.repr(found)}, not an object of {list(keys)} names; {SIDECAR_FIX}"
        )
    return {k: found[k] for k in keys if found.get(k)}


def list_length(feature: Any) -> int | None:
    return getattr(feature, "length", None)


def _float_dtype(name: str) -> torch.dtype | None:
    """The float dtype `name` names, or None: the one check of an activation dtype's name."""
    dt = dtypes.lookup(name)
    return dt if dt is not None and dt.is_floating_point else None


def torch_dtype(name: str, where: Path) -> torch.dtype:
    dt = _float_dtype(name)
    if dt is None:
        raise ConfigError(f"{where}: activation dtype {name!r} is not a float type activault stores")
    return dt


def read_column(table: Any, name: str, rows: slice) -> torch.Tensor:
    """Rows of a fixed-shape column as one flat tensor: a view of the memory-mapped file when the
    rows lie in one record batch, else one copy of each batch's values (Arrow lists are flattened
    without copying)."""
    parts = []
    for chunk in table.column(name).slice(rows.start, rows.stop - rows.start).chunks:
        values = chunk.storage if hasattr(chunk, "storage") else chunk
        while hasattr(values, "flatten"):
            values = values.flatten()
        parts.append(values.to_numpy(zero_copy_only=True))
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only mapping: these tensors are only read
        return torch.from_numpy(flat)


def chunks(cache: CachedActivations, start: int, rows_per_file: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(first row, {column: tensor}) per megabatch, from row `start` on."""
    n = cache.table.num_rows
    cols = [*cache.hooks, TOKEN_IDS] + ([POSITIONS] if cache.positions else [])
    for a in range(start, n, rows_per_file):
        b = min(a + rows_per_file, n)
        yield a, {c: read_column(cache.table, c, slice(a, b)) for c in cols}
