"""`activault verify` against synthetic runs: a clean run passes, each planted fault is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_inspection import HOOKS

from activault.storage import LocalStore
from activault.tools.verify import verify_run
from activault.vault import megabatch as fmt
from activault.vault.records import REBUILD
from support.collecting import run_cli
from support.synth import SynthRun, write_synthetic_run


@pytest.fixture
def vault(tmp_path: Path) -> tuple[LocalStore, SynthRun]:
    store = LocalStore(tmp_path / "vault", fsync=False)
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


def test_verify_clean_run_is_ok(vault, capsys) -> None:
    store, run = vault
    rc, out, _ = run_cli(["verify", str(store.root / "run")], capsys)
    assert rc == 0 and out.startswith("OK") and "2 hooks, 4 files" in out and "machines [0, 1]" in out
    assert f"{run.stats[HOOKS[0]].count:,} tokens" in out and "verify --deep" in out
    rc, out, _ = run_cli(["verify", "--deep", str(store.root / "run")], capsys)
    assert rc == 0 and "checksums checked" in out and "checksums verified in 8 of 8 readable files" in out


def problems_of(store: LocalStore, deep: bool = False) -> list[str]:
    return verify_run(store, "run", deep=deep).problems


def redo(machine: int) -> str:
    """The repair of a damaged progress record."""
    command = f"`activault collect --config <the run's config> --machine {machine}`"
    return f"rerun machine {machine}'s collect command ({command})"


def repair(machine: int) -> str:
    """The repair of a damaged or missing file: exactly the machine's bad files collected again."""
    return f"`activault collect --config <the run's config> --machine {machine} --repair`"


def test_verify_finds_a_file_deleted_in_one_hook(vault, capsys) -> None:
    store, run = vault
    store.delete(f"run/{HOOKS[1]}/{run.names[2]}")
    problems = problems_of(store)
    assert any(HOOKS[1] in p and "missing" in p and run.names[2] in p and repair(1) in p for p in problems)
    rc, out, _ = run_cli(["verify", str(store.root / "run")], capsys)
    assert rc == 1 and run.names[2] in out and "problem" in out


def test_verify_finds_mismatched_ids(vault) -> None:
    store, run = vault
    t = dict(run.files[HOOKS[1]][run.names[3]])
    t["input_ids"] = t["input_ids"].clone()
    t["input_ids"][0, 0] += 1
    store.put(f"run/{HOOKS[1]}/{run.names[3]}", fmt.encode(t, {"hook": HOOKS[1]}))
    (problem,) = problems_of(store)
    assert (
        problem.startswith(f"{HOOKS[1]}/{run.names[3]}: token ids or positions differ from {HOOKS[0]}/{run.names[3]}; ")
        and repair(1) in problem
    )


def test_verify_finds_missing_or_wrong_statistics(vault) -> None:
    store, _ = vault
    store.delete(f"run/{HOOKS[0]}/statistics.json")
    (problem,) = problems_of(store)
    assert problem.startswith(f"{HOOKS[0]}: statistics.json is missing; {REBUILD}")
    stats = json.loads(store.get_text(f"run/{HOOKS[1]}/statistics.json"))
    stats["count"] -= 1
    hist = stats["norm_hist"]  # kept consistent with count: else the record itself is damaged
    hist[next(i for i, c in enumerate(hist) if c)] -= 1
    stats["machines"] = [0]
    store.put_text(f"run/{HOOKS[1]}/statistics.json", json.dumps(stats))
    problems = problems_of(store)
    assert any("statistics.json counts" in p for p in problems) and any("covers machines [0]" in p for p in problems)


@pytest.mark.parametrize(
    "record, text, message",
    [
        ("cfg.json", "{not json", "cfg.json is not valid JSON"),
        (
            "cfg.json",
            '{"run_name": "run", "hooks": ["a"], "num_runs": 10000000000}',
            "field 'num_runs'",
        ),
        (f"{HOOKS[0]}/metadata.json", "[1, 2]", "metadata.json is not a JSON object"),
        (f"{HOOKS[0]}/statistics.json", '{"count": 0}', "statistics.json: field 'count'"),
        (
            "progress/machine-00001.json",
            '{"machine": 1, "num_runs": 2, "files_done": -3}',
            "field 'files_done'",
        ),
    ],
)
def test_damaged_records_are_named_with_file_field_and_repair(vault, capsys, record, text, message) -> None:
    store, _ = vault
    store.put_text(f"run/{record}", text)
    problems = problems_of(store)
    hit = [p for p in problems if message in p]
    assert hit and str(store.root / "run" / record) in hit[0], problems
    want = redo(1) if record.startswith("progress") else REBUILD
    assert want in hit[0]
    rc, out, err = run_cli(["verify", str(store.root / "run")], capsys)
    assert rc == 1 and "Traceback" not in out + err


def test_verify_names_foreign_objects_and_checks_the_rest(vault, tmp_path: Path, capsys) -> None:
    """A zero-byte megabatch, a link (out of the root, and to the run itself) and a FIFO in a hook
    folder: each is named once as a foreign object, none is read, and no hook is said to miss it."""
    store, run = vault
    hook = store.root / "run" / HOOKS[0]
    store.put(f"run/{HOOKS[0]}/m00009-000000.safetensors", b"")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"not ours")
    os.symlink(tmp_path / "elsewhere.safetensors", hook / "m00009-000001.safetensors")
    os.symlink(store.root / "run", hook / "loop")
    os.mkfifo(hook / "fifo")
    problems = problems_of(store)
    assert sorted(problems) == [
        f"{HOOKS[0]}/fifo: foreign object (a FIFO, device or socket), skipped; delete it (`rm` in `activault shell`)",
        f"{HOOKS[0]}/loop: foreign object (a symbolic link, never "
        "followed), skipped; delete it (`rm` in `activault shell`)",
        f"{HOOKS[0]}/m00009-000000.safetensors: foreign object (0 bytes, too short for a megabatch), skipped; "
        "delete it (`rm` in `activault shell`)",
        f"{HOOKS[0]}/m00009-000001.safetensors: foreign object (a symbolic link, never followed), skipped; "
        "delete it (`rm` in `activault shell`)",
    ]
    rc, out, _ = run_cli(["ls", str(store.root / "run")], capsys)
    assert rc == 0 and "foreign objects, skipped" in out and f"{HOOKS[0]}/loop  (a symbolic link" in out
    assert f"{HOOKS[0]}/  {len(run.names)} files" in out  # the foreign ones are not counted


def test_verify_on_a_store_root_lists_its_runs(vault, capsys) -> None:
    store, _ = vault
    write_synthetic_run(store, "other", HOOKS, machines=1, files=1)
    rc, out, err = run_cli(["verify", str(store.root)], capsys)
    assert rc == 2 and f"{store.root} is a store, not a run; verify one of its 2 run(s):" in out
    assert f"activault verify {store.root}/run\n" in out and f"activault verify {store.root}/other" in out
    rc, out, _ = run_cli(["verify", str(store.root / "other")], capsys)
    assert rc == 0 and out.startswith("OK")


# ---- what the progress records say ----


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_a_counted_file_emptied_or_lost_everywhere_is_named_with_its_repair(where, request, tmp_path: Path) -> None:
    from support.runstate import store_at

    store, _, _ = store_at(where, request, tmp_path)
    run = write_synthetic_run(store, "run", HOOKS, machines=2, files=2)
    store.put(f"run/{HOOKS[0]}/{run.names[2]}", b"")  # counted by machine 1's record
    store.put(f"run/{HOOKS[0]}/m00001-000007.safetensors", b"")  # counted by none: foreign, as before
    for h in HOOKS:
        store.delete(f"run/{h}/{run.names[1]}")  # lost from every hook: only machine 0's record has it
    problems = problems_of(store)
    assert any(
        p.startswith(f"{HOOKS[0]}/{run.names[2]}: 0 bytes, but machine 1's progress record counts it")
        and repair(1) in p
        for p in problems
    ), problems
    assert not any(run.names[2] in p and "foreign" in p for p in problems)  # named once, as lost
    assert any(p.startswith(f"{HOOKS[0]}/m00001-000007.safetensors: foreign object") for p in problems)
    for h in HOOKS:
        assert any(p.startswith(f"{h}: 1 file(s) missing") and run.names[1] in p and repair(0) in p for p in problems)
