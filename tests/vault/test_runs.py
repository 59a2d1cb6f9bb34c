"""A run's derived records (vault/runs.py): cfg.json joined, metadata.json rebuilt, statistics merged."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import LocalStore
from activault.tools.verify import verify_run
from activault.vault import records
from activault.vault.megabatch import encode
from activault.vault.records import read_metadata, read_progress, read_run, read_statistics, write_record
from activault.vault.runs import (
    check_every_machine,
    join_run,
    locate_run,
    merge_run_statistics,
    merge_statistics,
    rebuild_metadata,
)
from activault.vault.stats import merge_all
from support.collecting import run_cli
from support.synth import SynthRun, as_stats_version_1, write_synthetic_run

HOOKS = ["h1", "h2"]


@pytest.fixture
def synth(local: LocalStore) -> SynthRun:
    return write_synthetic_run(local, "run", HOOKS, machines=3, files=2)


# ---- merging statistics ----


class CountingStore(LocalStore):
    """A local store that counts whole-object reads per key."""

    def __init__(self, root: Path):
        super().__init__(root, fsync=False)
        self.gets: dict[str, int] = {}

    def get(self, key):
        self.gets[key] = self.gets.get(key, 0) + 1
        return super().get(key)


def test_merge_reads_each_record_once_and_equals_one_merge(tmp_path: Path):
    n = 12
    synth = write_synthetic_run(LocalStore(tmp_path, fsync=False), "run", HOOKS, machines=n, files=1)
    store = CountingStore(tmp_path)
    for h in HOOKS:
        store.delete(f"run/{h}/statistics.json")
    assert merge_statistics(store, "run", HOOKS, n) == list(range(n))
    progress = {k: c for k, c in store.gets.items() if "/progress/" in k}
    assert len(progress) == n and set(progress.values()) == {1}  # not once per machine per machine
    for h in HOOKS:
        got = read_statistics(store, f"run/{h}")
        assert got.machines == list(range(n)) and got.count == synth.stats[h].count
        assert got.mean == synth.stats[h].mean.tolist()  # same order of merging: the same bits


def test_merge_skips_another_machines_damaged_record_with_its_repair(local, synth, caplog):
    local.put_text("run/progress/machine-00001.json", '{"machine": 1, "num_runs": 3, "stats": 5}')
    with caplog.at_level(logging.WARNING):
        assert merge_statistics(local, "run", HOOKS, 3) == [0, 2]
    assert "machine-00001.json: field 'stats'" in caplog.text and "rerun machine 1's collect" in caplog.text
    assert read_statistics(local, "run/h1").machines == [0, 2]


def test_merge_ignores_unfinished_machines(local, synth):
    rec = read_progress(local, "run", 2)
    write_record(local, records.progress_key("run", 2), rec.model_copy(update={"finished": False}))
    assert merge_statistics(local, "run", HOOKS, 3) == [0, 1]
    parts = [read_progress(local, "run", m).stats["h1"].running() for m in (0, 1)]
    assert read_statistics(local, "run/h1").count == merge_all(parts).count


# ---- joining a run ----


def test_join_rebuilds_a_missing_or_damaged_cfg_and_lets_the_caller_refuse(local, synth, caplog):
    rec = read_run(local, "run")
    for damage in (lambda: local.delete("run/cfg.json"), lambda: local.put_text("run/cfg.json", "{")):
        damage()
        seen = []
        with caplog.at_level(logging.WARNING):
            join_run(local, rec, seen.append)
        assert seen == [None] and read_run(local, "run") == rec  # the caller saw nothing to check
    before = local.get("run/cfg.json").tobytes()

    def refuse(stored):
        assert stored == rec
        raise ConfigError("not this run")

    with pytest.raises(ConfigError, match="not this run"):
        join_run(local, rec.model_copy(update={"num_runs": 4}), refuse)
    assert local.get("run/cfg.json").tobytes() == before, "a refused join writes nothing"


def test_join_writes_cfg_only_when_it_differs(tmp_path: Path, synth):
    puts: list[str] = []

    class Counting(LocalStore):
        def put(self, key, data):
            puts.append(key)
            super().put(key, data)

    store = Counting(tmp_path, fsync=False)
    rec = read_run(store, "run")
    join_run(store, rec)
    assert puts == []
    join_run(store, rec.model_copy(update={"activault_version": "9"}))
    assert puts == ["run/cfg.json"]


# ---- rebuilding metadata.json ----


def wanted(synth_meta: records.HookMetadata, **change) -> dict[str, records.HookMetadata]:
    return {h: synth_meta.model_copy(update={"hook": h, **change}) for h in HOOKS}


def test_rebuild_metadata_restores_missing_damaged_or_contradicting_records(local, synth, caplog):
    meta = read_metadata(local, "run/h1")
    want = wanted(meta)
    before = {h: local.get(f"run/{h}/metadata.json").tobytes() for h in HOOKS}
    assert rebuild_metadata(local, "run", want, 0, 2) == []  # all fine: nothing written
    local.delete("run/h1/metadata.json")
    local.put_text("run/h2/metadata.json", '{"shape": 5}')
    with caplog.at_level(logging.WARNING):
        assert rebuild_metadata(local, "run", want, 0, 2) == HOOKS
    assert {h: local.get(f"run/{h}/metadata.json").tobytes() for h in HOOKS} == before
    assert "was missing" in caplog.text and "was damaged" in caplog.text
    # What the files hold comes from their header, not from what the caller believed.
    wrong = meta.model_copy(update={"d_model": 99, "shape": [4, 16, 99], "dtype": "float32"})
    write_record(local, "run/h1/metadata.json", wrong)
    assert rebuild_metadata(local, "run", wanted(wrong), 0, 2) == ["h1"]
    assert local.get("run/h1/metadata.json").tobytes() == before["h1"]


def test_rebuild_metadata_keeps_the_stored_compression_and_leaves_hooks_without_files(local, synth):
    meta = read_metadata(local, "run/h1")
    zstd = {"codec": "zstd", "level": 3, "chunk_bytes": 4096, "lossless": True}
    write_record(local, "run/h1/metadata.json", meta.model_copy(update={"compression": zstd}))
    assert rebuild_metadata(local, "run", wanted(meta), 0, 2) == []  # how new files are stored is not a contradiction
    assert read_metadata(local, "run/h1").compression == zstd
    empty = write_synthetic_run(local, "other", ["h"], files=1)
    for name in empty.names:
        local.delete(f"other/h/{name}")
    local.delete("other/h/metadata.json")
    assert rebuild_metadata(local, "other", {"h": meta.model_copy(update={"hook": "h"})}, 0, 0) == []
    assert read_metadata(local, "other/h") is None  # no file yet: its first file writes it


# ---- a run by its URI ----


def test_locate_and_merge_a_stored_run_by_uri(tmp_path: Path, synth):
    for h in HOOKS:
        (tmp_path / "run" / h / "statistics.json").unlink()
    assert locate_run(str(tmp_path / "run")).record.hooks == HOOKS
    assert merge_run_statistics(str(tmp_path / "run")) == [0, 1, 2]
    assert read_statistics(LocalStore(tmp_path), "run/h1").count == synth.stats["h1"].count
    with pytest.raises(NotFoundError, match="holds no cfg.json"):
        locate_run(str(tmp_path / "nothing"))
    assert json.loads((tmp_path / "run/h2/statistics.json").read_text())["machines"] == [0, 1, 2]


def test_merge_stats_recounts_statistics_that_counted_nan_in(tmp_path: Path, caplog) -> None:
    # A run as activault wrote it before statistics left out tokens with NaN (stats_version 1):
    # `activault merge-stats` recounts the machines concerned from their files, the others as stored.
    local = LocalStore(tmp_path, fsync=False)
    poison = [("h1", 3, 2, 5, math.nan)]  # machine 1 of 2, its first file
    synth = write_synthetic_run(local, "run", HOOKS, machines=2, files=3, nonfinite=poison)
    want = {h: read_statistics(local, f"run/{h}") for h in HOOKS}
    untouched = {m: read_progress(local, "run", m) for m in (0, 1)}
    as_stats_version_1(local, "run")
    old = read_statistics(local, "run/h1")
    assert old.stats_version == 1 and not old.running().finite and old.count == want["h1"].count + 1
    (problem,) = verify_run(local, "run").problems
    assert problem.startswith("h1: statistics.json counts 1 token(s) with NaN or Inf in") and "merge-stats" in problem
    with caplog.at_level(logging.WARNING):
        assert merge_run_statistics(str(tmp_path / "run")) == [0, 1]
    assert "machine 1, hook h1: statistics counted 1 token(s) with NaN or Inf in; recounted from its 3 files" in (
        caplog.text
    )
    for h in HOOKS:
        got = read_statistics(local, f"run/{h}")
        assert got.model_dump() == want[h].model_dump()  # the same bits as collected with this version
    assert read_progress(local, "run", 0) == untouched[0]  # machine 0 held no NaN: not reread
    assert read_progress(local, "run", 1).stats["h1"] == untouched[1].stats["h1"]
    assert synth.stats["h1"].nonfinite_tokens == 1
    assert verify_run(local, "run").problems == []  # count + nonfinite: the files' tokens


# ---- merge-stats leaves out no machine in silence ----


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
@pytest.mark.parametrize(
    "damage, error, message",
    [
        ({"finished": False}, FormatError, "machine 1 has not finished ("),
        ({"stats": {}}, FormatError, "field 'stats' has no statistics of hook(s) h1, h2 although the machine finished"),
        ({"files_done": 99}, FormatError, "field 'files_done' is 99, more than the 2"),
        ({"stats": 5}, FormatError, "machine-00001.json: field 'stats'"),
        (None, NotFoundError, "machine 1 has no progress record ("),
    ],
)
def test_merge_stats_refuses_a_machine_it_cannot_merge_naming_it_and_the_fix(
    where, request, tmp_path: Path, damage, error, message
):
    from support.runstate import edit_progress, store_at, with_plan

    store, _, _ = store_at(where, request, tmp_path)
    write_synthetic_run(store, "run", HOOKS, machines=3, files=2)
    with_plan(store, "run", n_batches=6)
    before = store.get_text("run/h1/statistics.json")
    if damage is None:
        store.delete("run/progress/machine-00001.json")
    else:
        edit_progress(store, "run", 1, **damage)
    with pytest.raises(error) as e:
        check_every_machine(store, "run", read_run(store, "run"))
    text = str(e.value)
    assert text.startswith("cannot merge statistics over every machine: machine 1") and message in text
    fix = "rerun machine 1's collect command" if damage and damage.get("finished") is not False else "--finished-only"
    assert fix in text and "--machine 1" in text
    assert store.get_text("run/h1/statistics.json") == before


def test_merge_stats_finished_only_merges_the_finished_machines_and_says_which(local, synth, capsys):
    from support.runstate import edit_progress

    edit_progress(local, "run", 1, finished=False)
    with pytest.raises(FormatError, match="machine 1 has not finished"):
        merge_run_statistics(str(local.root / "run"))
    rc, _, err = run_cli(["merge-stats", str(local.root / "run")], capsys)
    assert rc == 2 and "machine 1 has not finished" in err and "--finished-only" in err
    assert merge_run_statistics(str(local.root / "run"), finished_only=True) == [0, 2]
    rc, out, _ = run_cli(["merge-stats", "--finished-only", str(local.root / "run")], capsys)
    assert rc == 0 and "[0, 2]" in out
    got = read_statistics(local, "run/h1")
    parts = [read_progress(local, "run", m).stats["h1"].running() for m in (0, 2)]
    assert got.machines == [0, 2] and got.count == merge_all(parts).count


def test_a_finished_record_without_a_hooks_statistics_is_never_merged_as_if_complete(local, synth, caplog):
    from support.runstate import edit_progress

    rec = read_progress(local, "run", 2)
    edit_progress(local, "run", 2, stats={"h1": rec.stats["h1"].model_dump()})  # h2's are gone
    with caplog.at_level(logging.WARNING):
        assert merge_statistics(local, "run", HOOKS, 3) == [0, 1]  # was [0, 1, 2], h2 without machine 2
    assert "no statistics of hook(s) h2" in caplog.text and "rerun machine 2's collect" in caplog.text
    assert read_statistics(local, "run/h2").machines == [0, 1] == read_statistics(local, "run/h1").machines


# ---- metadata.json never rebuilt from a header that contradicts cfg.json ----


def test_rebuild_metadata_refuses_a_header_that_contradicts_cfg_json(local, synth, caplog):
    cfg = json.loads(local.get_text("run/cfg.json"))
    local.put_text("run/cfg.json", json.dumps({**cfg, "hook_dims": dict.fromkeys(HOOKS, 8)}))
    meta = read_metadata(local, "run/h1")
    before = local.get_text("run/h1/metadata.json")
    # Machine 0's first file of h1, rewritten with a header of d = 4 float32 (its own tensors, consistent).
    edited = {k: v.clone() for k, v in synth.files["h1"][synth.names[0]].items()}
    edited["states"] = torch.zeros(4, 16, 4)
    local.put("run/h1/" + synth.names[0], encode(edited, records.header_metadata("run", "h1", 0, 0, "synthetic")))
    with caplog.at_level(logging.WARNING):
        assert rebuild_metadata(local, "run", wanted(meta), 0, 2) == []  # was ["h1"]: rebuilt to d = 4
    assert local.get_text("run/h1/metadata.json") == before
    assert "its header says states of d = 4 in float32, cfg.json says hook h1 holds d = 8 in bfloat16" in caplog.text
    assert "--machine 0 --repair" in caplog.text
    local.delete("run/h1/metadata.json")  # now nothing right to keep: refused, naming the file
    with pytest.raises(FormatError) as e:
        rebuild_metadata(local, "run", wanted(meta), 0, 2)
    assert str(e.value).startswith(f"{local.url('run/h1/' + synth.names[0])}: its header says states of d = 4")
    assert "is not rebuilt from it" in str(e.value) and "--machine 0 --repair" in str(e.value)
    assert read_metadata(local, "run/h1") is None
