"""The run's records as schemas: every bad field is one FormatError naming the file, the field and the repair."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activault.errors import FormatError
from activault.vault.records import parse_record
from activault.vault.schemas import HookMetadata, HookStatistics, ProgressRecord, RunRecord

URL = "/vault/run/record.json"

VALID = {
    RunRecord: {"run_name": "r", "hooks": ["h"], "num_runs": 2},
    ProgressRecord: {"machine": 1, "num_runs": 2},
    HookMetadata: {
        "shape": [4, 16, 8],
        "dtype": "bfloat16",
        "d_model": 8,
        "seq_length": 16,
        "batch_size": 2,
        "batches_per_upload": 2,
        "rows_per_file": 4,
        "bytes_per_file": 4096,
    },
    HookStatistics: {
        "count": 5,
        "d_model": 2,
        "mean": [0.0, 1.0],
        "std": [1.0, 1.0],
        "m2": [5.0, 5.0],
        "norm": 1.0,
        "norm_sum": 5.0,
        "machines": [0, 1],
        "num_runs": 2,
    },
}


@pytest.mark.parametrize(
    "model, change, message",
    [
        (
            RunRecord,
            {"num_runs": 10**10},
            "field 'num_runs': Input should be less than or equal to 100000",
        ),
        (RunRecord, {"num_runs": "2"}, "field 'num_runs': Input should be a valid integer"),
        (RunRecord, {"hooks": None}, "field 'hooks'"),
        (RunRecord, {"hooks": ["a", "a"]}, "repeat a name"),
        (RunRecord, {"format_version": 7}, "newer than this activault reads"),
        (
            ProgressRecord,
            {"files_done": -1},
            "field 'files_done': Input should be greater than or equal to 0",
        ),
        (ProgressRecord, {"machine": 2}, "machine 2 is not below num_runs 2"),
        (ProgressRecord, {"finished": "yes"}, "field 'finished'"),
        (ProgressRecord, {"stats": {"h": {"count": 1}}}, "field 'stats.h.d_model' is missing"),
        (HookMetadata, {"rows_per_file": 0}, "field 'rows_per_file'"),
        (HookMetadata, {"bytes_per_file": -5}, "field 'bytes_per_file'"),
        (HookMetadata, {"dtype": "int8"}, "field 'dtype'"),
        (HookMetadata, {"d_model": 9}, "is not [rows_per_file, seq_length, d_model]"),
        (HookStatistics, {"count": 0}, "field 'count': Input should be greater than 0"),
        (HookStatistics, {"count": -4}, "field 'count'"),
        (HookStatistics, {"mean": [0.0]}, "mean has 1 values, d_model is 2"),
        (HookStatistics, {"std": [1.0, 2.0, 3.0]}, "std has 3 values, d_model is 2"),
        (HookStatistics, {"m2": [-1.0, 1.0]}, "a variance or norm is negative"),
        (HookStatistics, {"mean": [0.0, "x"]}, "field 'mean.1'"),
        (HookStatistics, {"machines": [1, 0]}, "machines [1, 0] are not distinct"),
        (HookStatistics, {"machines": [0, 5]}, "machines [0, 5] are not distinct"),
        (HookStatistics, {"d_model": None}, "field 'd_model'"),
    ],
)
def test_a_bad_field_is_one_format_error_naming_file_field_and_fix(model, change, message):
    data = {**VALID[model], **change}
    with pytest.raises(FormatError) as e:
        parse_record(json.dumps(data), model, URL, "FIX IT")
    text = str(e.value)
    assert text.startswith(f"{URL}: ") and message in text and text.endswith("; FIX IT")


def test_valid_records_parse():
    for model, data in VALID.items():
        assert isinstance(parse_record(json.dumps(data), model, URL, ""), model)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(VALID)), st.dictionaries(st.text(max_size=12), json_values, max_size=6), st.booleans())
def test_any_json_gives_a_record_or_a_format_error(model, mutation, start_valid):
    data = {**VALID[model], **mutation} if start_valid else mutation
    try:
        text = json.dumps(data)
    except ValueError:
        return
    try:
        assert isinstance(parse_record(text, model, URL, "FIX"), model)
    except FormatError as e:
        assert str(e).startswith(URL)


def test_an_import_written_by_an_older_version_still_reads():
    old = {
        "format": "activault",
        "format_version": 1,
        "run_name": "r",
        "hooks": ["h"],
        "num_runs": 1,
        "imported_from": {"format": "x", "path": "/c", "fingerprint": "f", "rows": 3, "documents": "one per row"},
    }
    rec = parse_record(json.dumps(old, indent=1), RunRecord, URL, "")
    assert rec.format_version == 1 and rec.imported_from is not None and rec.imported_from.rows == 3
