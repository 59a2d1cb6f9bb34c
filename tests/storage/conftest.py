"""Fixtures of the storage tests."""

from __future__ import annotations

import os

import pytest

from activault.storage import LocalStore


@pytest.fixture
def hostile(tmp_path):
    """A store holding a run, next to an outside folder; links from inside point out and back in."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"keep": true}')
    store = LocalStore(tmp_path / "vault")
    store.put("run/h/a.bin", b"data")
    store.put("run/cfg.json", b"{}")
    os.symlink(outside, store.root / "run/h/out")  # a folder outside
    os.symlink(outside / "secret.json", store.root / "run/h/file.json")  # a file outside
    os.symlink(store.root / "run", store.root / "run/h/loop")  # the run itself
    os.mkfifo(store.root / "run/h/fifo")
    return store, outside
