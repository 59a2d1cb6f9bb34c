"""Storage: local store atomicity, write errors, URIs."""


from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from activault.errors import NotFoundError, StorageError
from activault.storage import LocalStore, open_store


def test_local_store_put_is_atomic_and_listings_hide_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.put("run/h/a.bin", [b"ab", memoryview(b"cd")])
    (tmp_path / "run/h/.b.bin.1234.tmp").write_bytes(b"half")  # what a killed writer leaves
    assert bytes(store.get("run/h/a.bin")) == b"abcd"
    assert bytes(store.get_range("run/h/a.bin", 1, 3)) == b"bc"
    assert [e.key for e in store.list("run")] == ["run/h/a.bin"]
    assert store.list_dir("run") == (["h"], [])
    assert store.size("run/h/a.bin") == 4 and store.size("run/h/none") is None
    assert store.clear_partial("run/h", "b") == 1 and not (tmp_path / "run/h/.b.bin.1234.tmp").exists()
    store.delete("run/h/a.bin")
    assert not (tmp_path / "run").exists()  # emptied folders go too
    with pytest.raises(NotFoundError, match="does not exist"):
        store.get("run/h/a.bin")
    with pytest.raises(StorageError, match="escapes the store root"):
        store.put("../outside", b"x")


def test_local_store_write_error_names_the_fix(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "x").mkdir()  # the name is taken by a folder: the rename fails, as a full disk would
    with pytest.raises(StorageError, match="cannot write .*run the same command again to resume"):
        store.put("x", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp file left behind


def test_open_store_by_uri(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store("s3://bucket/some/prefix").url("k") == "s3://bucket/some/prefix/k"




def test_read_only_filesystem_is_one_message_from_every_cleanup(tmp_path, monkeypatch):
    """Once the filesystem turns read-only, the cleanup of a failed write fails too: the write's
    error is reported, and clearing the leftovers later is a StorageError, never a raw OSError."""
    store = LocalStore(tmp_path, fsync=False)
    (tmp_path / "run/h").mkdir(parents=True)
    (tmp_path / "run/h/.m00000-000001.safetensors.1234.tmp").write_bytes(b"half")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    message = "cannot write .*Read-only file system.*run the same command again"
    with pytest.raises(StorageError, match=message):
        store.put("run/h/m00000-000002.safetensors", b"data")
    message = "cannot remove the unfinished file .*Read-only file system"
    with pytest.raises(StorageError, match=message):
        store.clear_partial("run/h", "m00000-")
    with pytest.raises(StorageError, match="cannot delete .*Read-only file system"):
        store.delete("run/h/.m00000-000001.safetensors.1234.tmp")
