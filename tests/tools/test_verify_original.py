"""verify of a vault written by the original Activault: its records and `.pt` files checked, every
repair a restore, never a collect."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from test_inspection import HOOKS

from activault.storage import LocalStore
from support.collecting import run_cli


def test_verify_an_original_activault_vault(tmp_path: Path, capsys) -> None:
    from support.original import write_original_vault

    store = LocalStore(tmp_path / "vault", fsync=False)
    old = write_original_vault(store, "run", HOOKS, files=3)
    run = str(store.root / "run")
    rc, out, _ = run_cli(["verify", run], capsys)
    assert rc == 0 and out.startswith("OK") and "original Activault" in out and "2 hooks, 3 files per hook" in out
    assert "verify --deep" in out and "not exact" in out and "collect" not in out
    rc, out, _ = run_cli(["verify", "--deep", run], capsys)
    assert rc == 0 and f"{old.tensor(HOOKS[0]).shape[0] * 8:,} tokens, files loaded" in out
    # Damage: a file lost in one hook, another's ids changed, metadata.json unreadable.
    store.delete(f"run/{HOOKS[1]}/{old.names[0]}")
    bad = {**old.files[HOOKS[1]][old.names[1]]}
    bad["input_ids"] = bad["input_ids"] + 1
    buf = io.BytesIO()
    torch.save(bad, buf)
    store.put(f"run/{HOOKS[1]}/{old.names[1]}", buf.getvalue())
    store.put_text(f"run/{HOOKS[0]}/metadata.json", '{"d_in": 16, "dtype": "torch.float8"}')
    rc, out, _ = run_cli(["verify", "--deep", run], capsys)
    assert rc == 1 and "3 problem(s)" in out and "collect" not in out.replace(str(tmp_path), "")
    assert f"{HOOKS[1]}: 1 file(s) missing that other hooks have: {old.names[0]}; restore it" in out
    assert f"{HOOKS[1]}/{old.names[1]}: token ids differ from {HOOKS[0]}/{old.names[1]}" in out
    assert f"{HOOKS[0]}/metadata.json: field 'batch_size' is missing" in out and "original Activault" in out
