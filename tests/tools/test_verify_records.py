"""verify reads the run's records: a damaged or impossible progress record is named with a repair
that works, an unfinished run is called unfinished."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_inspection import HOOKS
from test_verify import problems_of, redo

from activault.storage import LocalStore
from activault.tools.verify import verify_run
from support.collecting import run_cli
from support.synth import SynthRun, write_synthetic_run


@pytest.fixture
def vault(tmp_path: Path) -> tuple[LocalStore, SynthRun]:
    store = LocalStore(tmp_path / "vault", fsync=False)
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_an_unfinished_run_is_called_unfinished_not_damaged(where, request, tmp_path: Path, capsys) -> None:
    from activault.vault.runs import merge_statistics
    from support.runstate import edit_progress, store_at

    store, root, _ = store_at(where, request, tmp_path)
    run = write_synthetic_run(store, "run", HOOKS, machines=3, files=2)
    # Machine 1 is writing its second file: in one hook so far, not counted; machine 2 has not started.
    edit_progress(store, "run", 1, files_done=1, finished=False)
    store.delete(f"run/{HOOKS[1]}/{run.names[3]}")
    for h in HOOKS:
        store.delete(f"run/{h}/{run.names[4]}")
        store.delete(f"run/{h}/{run.names[5]}")
    store.delete("run/progress/machine-00002.json")
    merge_statistics(store, "run", HOOKS, 3)  # as the finished machine 0 left them
    v = verify_run(store, "run")
    assert v.problems == [] and v.unfinished == [1, 2]  # was: statistics "wrong", merge-stats advised
    if where == "local":
        rc, out, _ = run_cli(["verify", f"{root}/run"], capsys)
        assert rc == 3 and "run unfinished: machines [1, 2] still collecting; rerun verify when they finish" in out
        assert "merge-stats" not in out and "problem(s)" not in out


def test_a_record_counting_more_files_than_planned_is_named_as_damaged(vault) -> None:
    from support.runstate import edit_progress, with_plan

    store, _ = vault
    with_plan(store, "run", n_batches=4)  # 2 files per machine
    edit_progress(store, "run", 1, files_done=99)
    (problem,) = problems_of(store)  # not 97 "missing" files
    assert "field 'files_done' is 99, more than the 2 file(s) machine 1 is planned to write" in problem
    assert redo(1) in problem


def test_following_the_advice_for_a_damaged_progress_record_repairs_the_run(tiny_model_dir, tmp_path: Path) -> None:
    from activault.collection.pipeline import collect
    from support.collecting import make_cfg, tree_bytes

    cfg = make_cfg(tiny_model_dir("llama"), tmp_path)
    collect(cfg, show_progress=False)
    store, run = LocalStore(tmp_path, fsync=False), tmp_path / "run"
    assert verify_run(store, "run").problems == []
    before = tree_bytes(run)
    (run / "progress/machine-00000.json").write_text('{"machine": 0, "num_runs": 1, "files_done": 3, "stats": 5}')
    (problem,) = verify_run(store, "run").problems
    assert f"delete {run}/progress/machine-00000.json and {redo(0)}" in problem
    (run / "progress/machine-00000.json").unlink()  # what it says: the damaged record, nothing else
    collect(cfg, show_progress=False)  # `activault collect --config <the run's config> --machine 0`
    assert verify_run(store, "run").problems == [] and tree_bytes(run) == before
