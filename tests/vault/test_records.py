"""Run records: every record through one schema, damage named with file, field and repair."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activault.errors import FormatError
from activault.storage import LocalStore
from activault.vault import records
from activault.vault.megabatch import FORMAT_VERSION
from activault.vault.records import (
    MAX_RECORD_BYTES,
    REBUILD,
    HookMetadata,
    HookStatistics,
    ProgressRecord,
    RunRecord,
    file_name,
    parse_file_name,
    parse_record,
    read_metadata,
    read_progress,
    read_progress_count,
    read_record,
    read_run,
    read_statistics,
    write_record,
)
from support.synth import SynthRun, write_synthetic_run

HOOKS = ["h1", "h2"]
URL = "/vault/run/record.json"
MODELS = [RunRecord, ProgressRecord, HookMetadata, HookStatistics]


@pytest.fixture
def synth(local: LocalStore) -> SynthRun:
    return write_synthetic_run(local, "run", HOOKS, machines=3, files=2)


def test_file_names_sort_by_machine_then_index_and_parse_back():
    names = [file_name(m, k) for m in (0, 1, 12) for k in (0, 1, 100)]
    assert names == sorted(names)
    assert [parse_file_name(n) for n in names] == [(m, k) for m in (0, 1, 12) for k in (0, 1, 100)]
    assert parse_file_name("statistics.json") is None and parse_file_name("abc--1.pt") is None
    assert parse_file_name("m٠١-000001.safetensors") is None  # non-ASCII digits are not ours


def test_records_round_trip_through_their_readers_byte_for_byte(local: LocalStore, synth: SynthRun):
    readers = {
        "run/cfg.json": lambda: read_run(local, "run"),
        "run/progress/machine-00002.json": lambda: read_progress(local, "run", 2),
        "run/h1/metadata.json": lambda: read_metadata(local, "run/h1"),
        "run/h2/statistics.json": lambda: read_statistics(local, "run/h2"),
    }
    for key, read in readers.items():
        before = bytes(local.get(key))
        write_record(local, key, read())
        assert bytes(local.get(key)) == before, key
    assert read_statistics(local, "run/h2").running().count == synth.stats["h2"].count


def test_a_record_is_one_sorted_field_per_line_with_floats_exact(local: LocalStore, synth: SynthRun):
    text = local.get("run/progress/machine-00002.json").tobytes().decode()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and text.endswith("}\n")
    keys = [json.loads("{" + line.rstrip(",") + "}").popitem()[0] for line in lines[1:-1]]
    assert keys == sorted(ProgressRecord.model_fields) and len(keys) == len(lines) - 2
    floats = [math.pi * 10.0**e for e in range(-300, 300, 7)] + [5e-324, -0.0]
    assert json.loads(records.record_text({"m": floats}))["m"] == floats  # shortest repr, exact
    assert records.record_text({"b": [0.1, float("nan")], "a": {"y": 1, "x": "é\n"}}) == (
        '{\n "a": {"x": "\\u00e9\\n", "y": 1},\n "b": [0.1, NaN]\n}\n'
    )


def test_absent_records_are_none(local: LocalStore):
    assert read_run(local, "nope") is None and read_metadata(local, "nope/h") is None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1]", "is not a JSON object"),
        (b"\xff\xfe", "is not valid JSON"),
        ("[" * 100_000, "is not valid JSON"),
        ("{}", "is missing"),
    ],
)
def test_garbage_of_any_kind_is_one_format_error(model, text, message):
    if model is ProgressRecord and text == "{}":
        text = '{"machine": 0}'
    with pytest.raises(FormatError, match=message) as e:
        parse_record(text, model, URL, "FIX IT")
    assert str(e.value).startswith(URL) and str(e.value).endswith("FIX IT")


def test_a_huge_object_under_a_record_name_is_refused_without_reading_it(tmp_path: Path):
    store = LocalStore(tmp_path)
    path = tmp_path / "run" / "cfg.json"
    path.parent.mkdir()
    path.write_text("{")
    os.truncate(path, 5 << 30)  # sparse
    with pytest.raises(
        FormatError, match=re.escape(f"is over {MAX_RECORD_BYTES} bytes, far more than a record holds; {REBUILD}")
    ):
        read_run(store, "run")
    assert MAX_RECORD_BYTES < 5 << 30


def _same_json(a: object, b: object) -> bool:
    """Equal values, floats bit for bit (NaN included), and the same types all the way down."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex() if not (math.isnan(a) and math.isnan(b)) else True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _json_or_error(parse, text):
    try:
        return parse(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return ("error", type(e).__name__)


def test_records_parse_to_exactly_what_json_loads_gives(local: LocalStore, synth: SynthRun):
    import random

    rng = random.Random(0)
    floats = [rng.gauss(0, 1) * 10.0 ** rng.randint(-300, 300) for _ in range(20_000)]
    floats += [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 0.1, 1 / 3, float("nan")]
    texts = [json.dumps({"m2": floats, "count": 2**70, "inf": [float("inf"), -float("inf")]})]
    texts += [(local.root / e.key).read_bytes() for e in local.list("run") if e.key.endswith(".json")]
    for text in texts:
        assert _same_json(records.loads(text), json.loads(text))
    # What the fast parser refuses, json.loads decides as before: accepts some, refuses others alike.
    for text in [b'\xef\xbb\xbf{"a": 1}', '{"a": "\\ud800"}', '{"a": 1} x', "[1,]", "", "nan", "[" * 5000 + "]" * 5000]:
        assert _json_or_error(records.loads, text) == _json_or_error(json.loads, text)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_json_value_parses_as_json_loads_parses_it(value):
    text = json.dumps(value)
    assert _same_json(records.loads(text), json.loads(text))
    assert _same_json(records.loads(text.encode()), json.loads(text.encode()))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MODELS), st.binary(max_size=200))
def test_any_bytes_give_a_record_or_a_format_error(model, raw):
    try:
        parse_record(raw, model, URL, "FIX")
    except FormatError as e:
        assert str(e).startswith(URL)


def test_progress_of_this_machine_damaged_names_the_repair(local, synth):
    local.put_text("run/progress/machine-00000.json", '{"machine": 0, "num_runs": 3, "tokens_done": 1.5}')
    with pytest.raises(FormatError, match="field 'tokens_done'.*delete .*machine-00000.json and rerun machine 0"):
        read_record(local, "run/progress/machine-00000.json", ProgressRecord, records.redo_machine(local.url("run"), 0))


def test_an_optional_field_added_later_is_left_out_while_unset(local: LocalStore):
    plain = RunRecord(run_name="r", hooks=["h"], num_runs=1)
    write_record(local, "a.json", plain)
    assert "imported_from" not in local.get_text("a.json")  # a collection's cfg.json keeps its bytes
    source = records.ImportSource(format="saelens", path="/c", fingerprint="f", rows=3, documents="one per row")
    write_record(local, "b.json", plain.model_copy(update={"imported_from": source}))
    got = parse_record(local.get_text("b.json"), RunRecord, "b.json", "")
    assert got.imported_from == source and got.format_version == FORMAT_VERSION


def test_the_original_activaults_records_are_told_apart_from_ours(local: LocalStore, synth: SynthRun):
    """Its metadata.json reads as ours ("torch.float16" and all); damage says whose record it is."""
    from support.original import write_original_vault

    write_original_vault(local, "old", ["h"], batch_size=4, batches_per_file=2, seq=8, d=16)
    meta = read_metadata(local, "old/h")
    assert meta is not None and meta.original is not None and meta.original.dtype == "torch.float16"
    assert (meta.shape, meta.dtype, meta.rows_per_file, meta.batch_size) == ([8, 8, 16], "float16", 8, 4)
    local.put_text("run/h1/metadata.json", "{oops")
    local.put_text("old/h/metadata.json", "{oops")
    with pytest.raises(FormatError) as ours:
        read_metadata(local, "run/h1")
    with pytest.raises(FormatError) as theirs:
        read_metadata(local, "old/h")
    assert REBUILD in str(ours.value) and "original Activault" not in str(ours.value)
    assert "collect" not in str(theirs.value) and "original Activault" in str(theirs.value)
    # Our own records keep their bytes: `original` is never written.
    assert "original" not in local.get_text("run/cfg.json") and "original" not in local.get_text("run/h2/metadata.json")


# ---- a progress record against the plan in cfg.json ----


@pytest.mark.parametrize("n_batches, num_runs, per_file", [(6, 1, 2), (7, 3, 2), (10, 4, 3), (5, 5, 1), (9, 2, 4)])
def test_planned_files_are_the_configs_share_of_each_machine(tmp_path: Path, n_batches, num_runs, per_file):
    from support.collecting import make_cfg

    cfg = make_cfg(
        tmp_path, tmp_path, num_runs=num_runs, data={"n_batches": n_batches}, upload={"batches_per_upload": per_file}
    )
    rec = RunRecord(run_name="run", hooks=["h"], num_runs=num_runs, config=cfg.to_public_dict())
    assert [records.planned_files(rec, m) for m in range(num_runs)] == [cfg.machine_files(m) for m in range(num_runs)]
    assert records.planned_files(rec.model_copy(update={"config": {}}), 0) is None  # no plan: nothing to check


# ---- the reader's count of a progress record (read_progress_count: the statistics skipped) ----

_SKIPPED = ("'stats", "'rows_done'", "'tokens_done'", "'data_state'")  # fields the count does not parse


def _count_or_error(read, store, machine=0, plan=None):
    try:
        rec = read(store, "run", machine, plan=plan)
    except FormatError as e:
        return ("error", str(e))
    return None if rec is None else (rec.machine, rec.num_runs, rec.files_done, rec.finished)


def _progress_texts(synth_text: bytes) -> list[bytes]:
    head = '"machine": 0, "num_runs": 3'
    texts = [synth_text, b"\xef\xbb\xbf" + synth_text, synth_text + b" x", synth_text[: len(synth_text) // 2]]
    texts += [
        t.encode()
        for t in [
            "{" + head + ', "files_done": 2, "finished": true}',
            "{" + head + ', "files_done": 1, "files_done": 2}',  # a repeated key: the last, as json.loads
            "{" + head + ', "files_done": 1.5}',
            "{" + head + ', "files_done": -1}',
            "{" + head + ', "files_done": "2"}',
            "{" + head + ', "finished": "yes"}',
            "{" + head + ', "data_state": {"s": "\\ud800"}}',  # a lone surrogate: json.loads takes it
            "{" + head + ', "files_done": NaN}',
            '{"machine": 1, "num_runs": 3}',  # the name says machine 0
            '{"machine": 3, "num_runs": 3}',
            '{"machine": 0}',
            "{not json",
            "[1]",
            "null",
            "",
            "[" * 100_000,
        ]
    ]
    return texts


def test_the_readers_count_of_a_progress_record_is_the_whole_records(local: LocalStore, synth: SynthRun):
    """Every text gives the count the whole record gives, or the same error; one that is damaged
    only in what the count skips is counted (the whole record's readers still refuse it)."""
    key = "run/progress/machine-00000.json"
    for text in _progress_texts(local.get(key).tobytes()):
        local.put(key, text)
        assert _count_or_error(read_progress_count, local) == _count_or_error(read_progress, local), text[:200]
    local.put(key, b'{"machine": 0, "num_runs": 3, "files_done": 2, "stats": {"h1": {"mean": "junk"}}}')
    assert _count_or_error(read_progress_count, local) == (0, 3, 2, False)
    with pytest.raises(FormatError, match="field 'stats"):
        read_progress(local, "run", 0)
    local.delete(key)
    assert read_progress_count(local, "run", 0) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120) | st.builds(lambda b: b'{"machine": 0, "num_runs": 3' + b, st.binary(max_size=60)))
def test_any_bytes_give_the_count_the_whole_record_gives_or_its_error(tmp_path_factory, raw):
    store = LocalStore(tmp_path_factory.mktemp("count"))
    store.put("run/progress/machine-00000.json", raw)
    count, whole = _count_or_error(read_progress_count, store), _count_or_error(read_progress, store)
    skipped_only = isinstance(whole, tuple) and whole[0] == "error" and any(f in whole[1] for f in _SKIPPED)
    assert count == whole or (skipped_only and count[0] != "error"), (raw, count, whole)


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_a_progress_record_counting_more_files_than_planned_is_refused(where, request, tmp_path: Path):
    from support.runstate import edit_progress, store_at, with_plan

    store, _, _ = store_at(where, request, tmp_path)
    write_synthetic_run(store, "run", HOOKS, machines=3, files=3)
    with_plan(store, "run", n_batches=9)  # 3 files per machine
    plan = read_run(store, "run")
    assert read_progress(store, "run", 1, plan=plan).files_done == 3  # its share exactly: fine
    edit_progress(store, "run", 1, files_done=99)
    assert read_progress(store, "run", 1).files_done == 99  # without the plan nothing says otherwise
    with pytest.raises(FormatError) as e:
        read_progress(store, "run", 1, plan=plan)
    text = str(e.value)
    assert text.startswith(f"{store.url('run/progress/machine-00001.json')}: field 'files_done' is 99, more than the 3")
    assert "delete " in text and "rerun machine 1's collect command" in text
    with pytest.raises(FormatError, match="files_done' is 99"):  # what the collection pipeline calls
        records.check_against_plan(read_progress(store, "run", 1), 3, store, "run")
    assert _count_or_error(read_progress_count, store, 1, plan) == ("error", text)  # what a reader lists by
