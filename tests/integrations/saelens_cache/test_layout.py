"""integrations/saelens_cache/layout.py: SAELens's cached-activation layout (an HF `datasets` folder),
read from folders that `datasets` itself wrote: columns, widths, dtypes, rows across Arrow files, zero-copy
conversions; folders that are not such a cache are refused naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, DatasetDict

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.integrations.saelens_cache.layout import (
    POSITIONS,
    SIDECAR,
    TOKEN_IDS,
    arrow_2d,
    arrow_ids,
    chunks,
    features,
    open_cache,
    read_column,
    torch_dtype,
)

SEQ, ROWS = 6, 10
D = {"blocks.0.hook_resid_post": 4, "blocks.1.hook_mlp_out": 3}


def columns(dtype: str = "float32", positions: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {c: rng.standard_normal((ROWS, SEQ, d)).astype(dtype) for c, d in D.items()}
    out[TOKEN_IDS] = rng.integers(0, 50_000, (ROWS, SEQ), dtype=np.int32)
    if positions:
        out[POSITIONS] = np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1))
    return out


def save_cache(path: Path, data: dict[str, np.ndarray], dtype: str = "float32", shards: int = 1) -> Path:
    """A cache as SAELens's CacheActivationsRunner leaves it, written by `datasets` itself."""
    feats = features({c: c for c in D}, SEQ, D, {c: dtype for c in D}, POSITIONS in data)
    Dataset.from_dict({k: v.tolist() for k, v in data.items()}, features=feats).save_to_disk(
        str(path), num_shards=shards
    )
    return path


def test_features_are_saelens_columns():
    feats = features({"h": "blocks.0.hook_resid_post"}, SEQ, {"h": 4}, {"h": "float16"}, positions=True)
    col = feats["blocks.0.hook_resid_post"]
    assert type(col).__name__ == "Array2D" and col.shape == (SEQ, 4) and col.dtype == "float16"
    for name in (TOKEN_IDS, POSITIONS):
        assert feats[name].length == SEQ and feats[name].feature.dtype == "int32"
    assert POSITIONS not in features({"h": "c"}, SEQ, {"h": 4}, {"h": "float32"}, positions=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_arrow_2d_shares_the_tensors_memory_and_keeps_its_values(dtype):
    feats = features({"h": "h"}, SEQ, {"h": 4}, {"h": str(dtype)[6:]}, positions=False)
    x = torch.randn(ROWS, SEQ, 4).to(dtype)
    arr = arrow_2d(feats["h"](), x)
    values = arr.storage.flatten().flatten()
    assert values.buffers()[1].address == x.data_ptr(), "no copy"
    assert np.array_equal(values.to_numpy().reshape(ROWS, SEQ, 4), x.numpy())
    assert len(arr) == ROWS and arr.type == feats["h"]()


def test_arrow_ids_are_fixed_length_int32_rows():
    ids = torch.arange(ROWS * SEQ, dtype=torch.int64).view(ROWS, SEQ)
    arr = arrow_ids(ids)
    assert arr.type == pa.list_(pa.int32(), SEQ) and len(arr) == ROWS
    assert arr.flatten().to_numpy().tolist() == ids.flatten().tolist()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_cache_written_by_datasets_opens_with_its_columns_widths_and_dtypes(tmp_path, dtype):
    data = columns(dtype, positions=True)
    path = save_cache(tmp_path / "cache", data, dtype)
    cache = open_cache(path, None, None)
    assert cache.hooks == {c: c for c in D} and cache.dims == D and cache.seq == SEQ and cache.positions
    assert cache.source_dtypes == cache.stored_dtypes == {c: getattr(torch, dtype) for c in D}
    assert cache.fingerprint == json.loads((path / "state.json").read_text())["_fingerprint"]
    assert cache.table.num_rows == ROWS and cache.path == path.absolute()
    for c in D:
        got = read_column(cache.table, c, slice(0, ROWS)).view(ROWS, SEQ, D[c])
        assert np.array_equal(got.numpy(), data[c])
    assert np.array_equal(read_column(cache.table, TOKEN_IDS, slice(2, 5)).view(3, SEQ).numpy(), data[TOKEN_IDS][2:5])


def test_rows_across_arrow_files_read_in_order(tmp_path):
    data = columns()
    cache = open_cache(save_cache(tmp_path / "cache", data, shards=3), None, None)
    assert cache.table.column(TOKEN_IDS).num_chunks == 3
    c = next(iter(D))
    for a, b in [(0, ROWS), (2, 9), (3, 4), (0, 1), (9, 10)]:  # within one file and across files
        got = read_column(cache.table, c, slice(a, b)).view(b - a, SEQ, D[c])
        assert np.array_equal(got.numpy(), data[c][a:b])
    pieces = list(chunks(cache, 1, 4))
    assert [first for first, _ in pieces] == [1, 5, 9]
    for first, cols in pieces:
        n = min(4, ROWS - first)
        assert set(cols) == {*D, TOKEN_IDS}
        assert np.array_equal(cols[TOKEN_IDS].view(n, SEQ).numpy(), data[TOKEN_IDS][first : first + n])
    assert list(chunks(cache, ROWS, 4)) == []


def test_the_sidecar_names_hooks_and_stored_dtypes_and_arguments_override_it(tmp_path):
    path = save_cache(tmp_path / "cache", columns())
    cols = list(D)
    sidecar = {"columns": {cols[0]: {"hook": "models.layers.0.post", "dtype": "bfloat16"}}}
    (path / SIDECAR).write_text(json.dumps(sidecar))
    cache = open_cache(path, None, None)
    assert cache.hooks == {cols[0]: "models.layers.0.post", cols[1]: cols[1]}
    assert cache.stored_dtypes == {cols[0]: torch.bfloat16, cols[1]: torch.float32}
    assert cache.source_dtypes == {c: torch.float32 for c in cols}
    assert open_cache(path, [cols[1]], None).hooks == {cols[1]: cols[1]}
    assert open_cache(path, {cols[0]: "renamed"}, "float16").hooks == {cols[0]: "renamed"}
    assert open_cache(path, None, "float16").stored_dtypes == {c: torch.float16 for c in cols}
    with pytest.raises(ConfigError, match="stored as float64, which activault does not store .*dtype='float32'"):
        open_cache(path, None, torch.float64)  # was: accepted, then an "invalid config" error naming no fix


@pytest.mark.parametrize(
    "sidecar,problem",
    [
        (b"{garbage", "is not valid JSON"),  # was: a raw JSONDecodeError
        (b"\xff\xfe{}", "is not valid JSON"),
        (b"[1, 2]", "is a JSON list, not an object"),
        (b'{"columns": [1]}', "field 'columns' is [1], not an object of columns"),  # was: AttributeError
        (b'{"columns": {"c": 5}}', "columns.c is 5, not an object"),
        (b'{"columns": {"c": {"hook": 7}}}', "columns.c.hook is 7, not a name"),
        (b'{"columns": {"c": {"hook": ""}}}', "columns.c.hook is '', not a name"),
        (b'{"columns": {"c": {"dtype": 5}}}', "columns.c.dtype is 5, not a name"),  # was: 5 passed through
        (b'{"columns": {"c": {"dtype": "int32"}}}', "columns.c.dtype 'int32' is not a float type activault stores"),
    ],
)
def test_a_damaged_sidecar_is_one_format_error_naming_it_and_the_field(tmp_path, sidecar, problem):
    path = save_cache(tmp_path / "cache", columns())
    (path / SIDECAR).write_bytes(sidecar)
    for hooks, dtype in ((None, None), (list(D), "float16")):  # read whether or not arguments override it
        with pytest.raises(FormatError) as e:
            open_cache(path, hooks, dtype)
        text = str(e.value)
        assert text.startswith(str(path / SIDECAR)) and problem in text and "delete it" in text, text


def test_a_sidecar_without_columns_or_with_null_fields_is_the_defaults(tmp_path):
    path = save_cache(tmp_path / "cache", columns())
    cols = list(D)
    for sidecar in ({}, {"columns": {}}, {"columns": {cols[0]: {"hook": None, "dtype": None}}}, {"other": 1}):
        (path / SIDECAR).write_text(json.dumps(sidecar))
        cache = open_cache(path, None, None)
        assert cache.hooks == {c: c for c in cols} and cache.stored_dtypes == {c: torch.float32 for c in cols}


@pytest.mark.parametrize("name", ["float32", "F16", "bfloat16", "torch.float64"])
def test_torch_dtype_of_float_names(name, tmp_path):
    assert torch_dtype(name, tmp_path).is_floating_point


@pytest.mark.parametrize("garbage", ["int32", "bool", "U8", "bf16", "float8", "", "x" * 5000])
def test_torch_dtype_refuses_what_is_no_stored_float(garbage, tmp_path):
    with pytest.raises(ConfigError, match=r"activation dtype .* is not a float type activault stores"):
        torch_dtype(garbage, tmp_path)


# ---- folders that are not a cache ----


def test_a_folder_without_state_json_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="no state.json.*cached_activations_path"):
        open_cache(tmp_path, None, None)
    with pytest.raises(NotFoundError):
        open_cache(tmp_path / "missing", None, None)


@pytest.mark.parametrize("damage", ["state.json", "dataset_info.json", "arrow"])
def test_a_damaged_cache_is_a_format_error_naming_the_folder(tmp_path, damage):
    path = save_cache(tmp_path / "cache", columns())
    target = next(path.glob("*.arrow")) if damage == "arrow" else path / damage
    target.write_bytes(b"{garbage" if damage != "arrow" else target.read_bytes()[:100])
    with pytest.raises(FormatError, match=str(path)):
        cache = open_cache(path, None, None)
        read_column(cache.table, next(iter(D)), slice(0, ROWS))


def test_a_cache_without_token_ids_is_refused(tmp_path):
    data = columns()
    del data[TOKEN_IDS]
    feats = features({c: c for c in D}, SEQ, D, {c: "float32" for c in D}, False)
    del feats[TOKEN_IDS]
    Dataset.from_dict({k: v.tolist() for k, v in data.items()}, features=feats).save_to_disk(str(tmp_path / "c"))
    with pytest.raises(FormatError, match="no 'token_ids' column"):
        open_cache(tmp_path / "c", None, None)


def test_columns_that_are_not_there_are_listed_with_those_that_are(tmp_path):
    path = save_cache(tmp_path / "cache", columns())
    with pytest.raises(ConfigError) as e:
        open_cache(path, ["blocks.9.hook_resid_post"], None)
    assert "'blocks.9.hook_resid_post'" in str(e.value) and all(c in str(e.value) for c in D)
    with pytest.raises(ConfigError, match="no activation column"):
        open_cache(path, [], None)
    with pytest.raises(ConfigError, match="no activation column"):
        open_cache(path, [TOKEN_IDS], None)


def test_an_integer_activation_column_is_refused(tmp_path):
    path = save_cache(
        tmp_path / "cache", {**columns(), **{c: np.ones((ROWS, SEQ, d), np.int32) for c, d in D.items()}}, "int32"
    )
    with pytest.raises(ConfigError, match="activation dtype 'int32' is not a float type"):
        open_cache(path, None, None)
    with pytest.raises(ConfigError, match="'int8' is not a float type"):
        open_cache(save_cache(tmp_path / "f", columns()), None, "int8")


def test_columns_of_different_context_sizes_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    short = {"a": rng.standard_normal((ROWS, SEQ, 2)).astype("float32"), TOKEN_IDS: np.zeros((ROWS, SEQ), np.int32)}
    long = rng.standard_normal((ROWS, SEQ + 1, 2)).astype("float32")
    feats = features({"a": "a"}, SEQ, {"a": 2}, {"a": "float32"}, False)
    feats["b"] = features({"b": "b"}, SEQ + 1, {"b": 2}, {"b": "float32"}, False)["b"]
    data = {**short, "b": long}
    Dataset.from_dict({k: v.tolist() for k, v in data.items()}, features=feats).save_to_disk(str(tmp_path / "c"))
    with pytest.raises(FormatError, match="columns disagree on the context size"):
        open_cache(tmp_path / "c", None, None)


def test_a_dataset_of_several_splits_asks_for_one(tmp_path):
    feats = features({c: c for c in D}, SEQ, D, {c: "float32" for c in D}, False)
    split = Dataset.from_dict({k: v.tolist() for k, v in columns().items()}, features=feats)
    DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd" / "state.json").write_text("{}")  # as if the folder were one dataset
    with pytest.raises(ConfigError, match=r"holds several splits \(\['train', 'test'\]\): pass one split's folder"):
        open_cache(tmp_path / "dd", None, None)


def save_ids(path: Path, ids: list[list[Any]], dtype: str, column: str = TOKEN_IDS) -> Path:
    """A cache whose `column` (token ids, or positions beside valid ids) holds `ids` as `dtype`."""
    from datasets import Sequence, Value

    data: dict[str, Any] = {k: v.tolist() for k, v in columns(positions=column == POSITIONS).items()}
    feats = features({c: c for c in D}, SEQ, D, {c: "float32" for c in D}, column == POSITIONS)
    data[column], feats[column] = ids, Sequence(Value(dtype), length=len(ids[0]))
    Dataset.from_dict(data, features=feats).save_to_disk(str(path))
    return path


def rows_with(first: list[Any], rest: Any = 0) -> list[list[Any]]:
    return [first] + [[rest] * SEQ for _ in range(ROWS - 1)]


@pytest.mark.parametrize(
    "column,ids,dtype,problem",
    [  # each was stored: wrapped or truncated to another int32, or kept as a meaningless one
        (TOKEN_IDS, rows_with([0, 0, 2**40 + 5, 0, 0, 0]), "int64", "row 0, token 2, of column 'token_ids' is 1099"),
        (TOKEN_IDS, rows_with([0, 0, 0, 0, 0, -7]), "int32", "row 0, token 5, of column 'token_ids' is -7, not one"),
        (TOKEN_IDS, rows_with([1.5] * SEQ, 1.0), "float32", "column 'token_ids' holds float values, not integer"),
        (
            TOKEN_IDS,
            rows_with(["a"] * SEQ, "b"),
            "string",
            "column 'token_ids' holds string values",
        ),  # was: ArrowInvalid
        (POSITIONS, rows_with([2**33, 1, 2, 3, 4, 5]), "int64", "row 0, token 0, of column 'positions' is 8589934592"),
        (
            POSITIONS,
            rows_with([-5, 1, 2, 3, 4, 5]),
            "int32",
            "of column 'positions' is -5, not one of the positions (-1",
        ),
        (
            POSITIONS,
            [[0, 1, 2]] * ROWS,
            "int32",
            "disagree on the context size ([(6, 3), (6, 4)], token_ids 6, positions 3)",
        ),
    ],
)
def test_token_ids_and_positions_a_vault_cannot_hold_as_int32_are_refused(tmp_path, column, ids, dtype, problem):
    path = save_ids(tmp_path / "c", ids, dtype, column)
    with pytest.raises(FormatError) as e:
        open_cache(path, None, None)
    assert problem in str(e.value) and "re-create the cache" in str(e.value), str(e.value)


def test_activation_columns_without_values_are_refused(tmp_path):
    feats = features({"a": "a"}, SEQ, {"a": 0}, {"a": "float32"}, False)
    data = {"a": np.zeros((ROWS, SEQ, 0), np.float32).tolist(), TOKEN_IDS: np.zeros((ROWS, SEQ), np.int32).tolist()}
    Dataset.from_dict(data, features=feats).save_to_disk(str(tmp_path / "c"))
    with pytest.raises(FormatError, match=r"shape \[\(6, 0\)\] hold no values"):  # was: ZeroDivisionError
        open_cache(tmp_path / "c", None, None)


def test_a_cache_of_no_rows_says_so(tmp_path):
    feats = features({c: c for c in D}, SEQ, D, {c: "float32" for c in D}, False)
    empty = {k: v[:0].tolist() for k, v in columns().items()}
    Dataset.from_dict(empty, features=feats).save_to_disk(str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="holds no rows \\(its state.json lists no Arrow files\\): there is nothing"):
        open_cache(tmp_path / "c", None, None)  # was: state.json called damaged, "re-create the cache"
