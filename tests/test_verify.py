"""`activault verify` against synthetic runs: a clean run passes, each planted fault is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_inspection import HOOKS, run_cli

from activault.storage import LocalStore
from activault.tools.verify import verify_run
from activault.vault import megabatch as fmt
from support.synth import SynthRun, write_synthetic_run


@pytest.fixture
def vault(tmp_path: Path) -> tuple[LocalStore, SynthRun]:
    store = LocalStore(tmp_path / "vault", fsync=False)
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


def test_verify_clean_run_is_ok(vault, capsys) -> None:
    store, run = vault
    rc, out, _ = run_cli(["verify", str(store.root / "run")], capsys)
    assert rc == 0 and out.startswith("OK") and "2 hooks, 4 files" in out and "machines [0, 1]" in out
    assert f"{run.stats[HOOKS[0]].count:,} tokens" in out


def problems_of(store: LocalStore) -> list[str]:
    problems, _ = verify_run(store, "run")
    return problems


def test_verify_finds_a_file_deleted_in_one_hook(vault, capsys) -> None:
    store, run = vault
    store.delete(f"run/{HOOKS[1]}/{run.names[2]}")
    problems = problems_of(store)
    assert any(HOOKS[1] in p and "missing" in p and run.names[2] in p for p in problems)
    rc, out, _ = run_cli(["verify", str(store.root / "run")], capsys)
    assert rc == 1 and run.names[2] in out and "problem" in out


def test_verify_finds_a_truncated_file(vault) -> None:
    store, run = vault
    key = f"run/{HOOKS[0]}/{run.names[1]}"
    store.put(key, bytes(store.get(key))[:-100])
    problems = problems_of(store)
    assert any(f"{HOOKS[0]}/{run.names[1]}" in p and "truncated" in p for p in problems), problems


def test_verify_finds_mismatched_ids(vault) -> None:
    store, run = vault
    t = dict(run.files[HOOKS[1]][run.names[3]])
    t["input_ids"] = t["input_ids"].clone()
    t["input_ids"][0, 0] += 1
    store.put(f"run/{HOOKS[1]}/{run.names[3]}", fmt.encode(t, {"hook": HOOKS[1]}))
    problems = problems_of(store)
    assert problems == [f"{HOOKS[1]}/{run.names[3]}: token ids or positions differ from {HOOKS[0]}/{run.names[3]}"]


def test_verify_finds_missing_or_wrong_statistics(vault) -> None:
    store, _ = vault
    store.delete(f"run/{HOOKS[0]}/statistics.json")
    assert problems_of(store) == [f"{HOOKS[0]}: statistics.json is missing"]
    stats = json.loads(store.get_text(f"run/{HOOKS[1]}/statistics.json"))
    stats["count"] -= 1
    stats["machines"] = [0]
    store.put_text(f"run/{HOOKS[1]}/statistics.json", json.dumps(stats))
    problems = problems_of(store)
    assert any("statistics.json counts" in p for p in problems) and any("covers machines [0]" in p for p in problems)


def test_verify_finds_shape_and_dtype_mismatch(vault) -> None:
    store, run = vault
    t = dict(run.files[HOOKS[0]][run.names[0]])
    t["states"] = t["states"].float()
    store.put(f"run/{HOOKS[0]}/{run.names[0]}", fmt.encode(t, {}))
    meta = json.loads(store.get_text(f"run/{HOOKS[1]}/metadata.json"))
    meta["d_model"] = 9
    store.put_text(f"run/{HOOKS[1]}/metadata.json", json.dumps(meta))
    problems = problems_of(store)
    assert any("dtype float32" in p and "bfloat16" in p for p in problems)
    assert sum("does not match metadata.json" in p and HOOKS[1] in p for p in problems) == 4


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
        f"{HOOKS[0]}/fifo: foreign object (a FIFO, device or socket), skipped; delete it (`rm` in `activault s3`)",
        f"{HOOKS[0]}/loop: foreign object (a symbolic link, never followed), skipped; delete it (`rm` in `activault s3`)",
        f"{HOOKS[0]}/m00009-000000.safetensors: foreign object (0 bytes, too short for a megabatch), skipped; "
        "delete it (`rm` in `activault s3`)",
        f"{HOOKS[0]}/m00009-000001.safetensors: foreign object (a symbolic link, never followed), skipped; "
        "delete it (`rm` in `activault s3`)",
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
