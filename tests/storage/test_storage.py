"""Storage: local store atomicity, write errors, URIs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from activault.errors import ConfigError, NotFoundError, StorageError
from activault.storage import Entry, LocalStore, locate, open_store
from activault.storage.base import populate
from support.pagecache import cached_pages


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


# ---- links, FIFOs and devices: nothing outside the root is reachable ----


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


def test_local_store_lists_links_and_special_files_as_such(hostile):
    store, _ = hostile
    kinds = {e.key: e.kind for e in store.list("run")}
    assert kinds == {
        "run/cfg.json": "file",
        "run/h/a.bin": "file",
        "run/h/file.json": "link",
        "run/h/fifo": "special",
        "run/h/loop": "link",
        "run/h/out": "link",
    }
    dirs, files = store.list_dir("run/h")
    assert dirs == [] and {e.key.rsplit("/", 1)[-1]: e.kind for e in files} == {
        "a.bin": "file",
        "file.json": "link",
        "fifo": "special",
        "loop": "link",
        "out": "link",
    }
    assert all(e.size == 0 for e in files if e.kind != "file")


@pytest.mark.parametrize("key", ["run/h/out/secret.json", "run/h/loop/cfg.json", "run/h/file.json", "run/h/out"])
def test_local_store_never_reads_through_a_link(hostile, key):
    store, _ = hostile
    for call in (
        lambda: store.get(key),
        lambda: store.get_range(key, 0, 4),
        lambda: store.size(key),
        lambda: store.read_into(key, 0, memoryview(bytearray(4))),
        lambda: store.map(key),
    ):
        with pytest.raises(StorageError, match="symbolic link"):
            call()
    with pytest.raises(StorageError, match="symbolic link"):
        store.list_dir(key) if key.endswith("out") else store.list(key + "/x")


def test_local_store_fifo_is_refused_without_blocking(hostile):
    store, _ = hostile
    for call in (
        lambda: store.get("run/h/fifo"),
        lambda: store.size("run/h/fifo"),
        lambda: store.get_range("run/h/fifo", 0, 8),
        lambda: store.map("run/h/fifo"),
    ):
        with pytest.raises(StorageError, match="not a regular file"):
            call()
    with pytest.raises(StorageError, match="not a regular file"):
        LocalStore("/").get("dev/zero")  # a device: refused, not read forever


def test_local_store_delete_removes_links_never_their_targets(hostile):
    store, outside = hostile
    for e in store.list("run/h"):
        store.delete(e.key)
    assert (outside / "secret.json").read_text() == '{"keep": true}'
    assert store.get_text("run/cfg.json") == "{}" and store.list("run") == [Entry("run/cfg.json", 2)]
    assert not (store.root / "run/h").exists()
    with pytest.raises(StorageError, match="is a folder"):
        store.delete("run")
    with pytest.raises(StorageError, match="escapes the store root"):
        store.delete("run/../../outside/secret.json")


def test_local_store_put_replaces_a_link_instead_of_writing_through_it(hostile):
    store, outside = hostile
    store.put("run/h/file.json", b"new")
    assert (outside / "secret.json").read_text() == '{"keep": true}'
    assert store.get_text("run/h/file.json") == "new" and store.list("run/h/file.json")[0].kind == "file"
    with pytest.raises(StorageError, match="symbolic link"):
        store.put("run/h/out/x", b"x")
    assert not (outside / "x").exists()


def test_a_linked_root_is_the_users_choice(tmp_path):
    real = LocalStore(tmp_path / "real")
    real.put("run/cfg.json", b"{}")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    store = LocalStore(tmp_path / "alias")
    assert [e.key for e in store.list()] == ["run/cfg.json"] and store.get_text("run/cfg.json") == "{}"


def test_locate_roots_local_paths_at_the_store_of_the_nearest_run(hostile, tmp_path):
    store, _ = hostile
    for path, key in [("run", "run"), ("run/h/a.bin", "run/h/a.bin"), ("run/h/../cfg.json", "run/cfg.json")]:
        found, k = locate(store.root / path)
        assert (Path(found.uri), k) == (store.root, key)
    found, k = locate(tmp_path / "outside")  # no run: the folder itself
    assert (Path(found.uri), k) == (tmp_path / "outside", "")
    found, k = locate(store.root / "run/h/out/secret.json")
    with pytest.raises(StorageError, match="symbolic link"):
        found.get(k)


def test_read_only_filesystem_is_one_message_from_every_cleanup(tmp_path, monkeypatch):
    """Once the filesystem turns read-only, the cleanup of a failed write fails too: the write's
    error is reported, and clearing the leftovers later is a StorageError, never a raw OSError."""
    store = LocalStore(tmp_path, fsync=False)
    (tmp_path / "run/h").mkdir(parents=True)
    (tmp_path / "run/h/.m00000-000001.safetensors.1234.tmp").write_bytes(b"half")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(os, "unlink", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    message = "cannot write .*Read-only file system.*run the same command again"
    with pytest.raises(StorageError, match=message):
        store.put("run/h/m00000-000002.safetensors", b"data")
    message = "cannot remove the unfinished file .*Read-only file system"
    with pytest.raises(StorageError, match=message):
        store.clear_partial("run/h", "m00000-")
    with pytest.raises(StorageError, match="cannot delete .*Read-only file system"):
        store.delete("run/h/.m00000-000001.safetensors.1234.tmp")


def test_local_store_maps_files_copy_on_write(tmp_path):
    store = LocalStore(tmp_path)
    store.put("a.bin", b"0123456789")
    store.put("empty.bin", b"")
    mapping = store.map("a.bin")
    assert mapping is not None and bytes(mapping) == b"0123456789"
    mapping[0:2] = b"xx"  # a reader may write into what it was given: the file never changes
    assert store.get_text("a.bin") == "0123456789"
    assert store.map("empty.bin") is None  # nothing to map: read instead
    with pytest.raises(NotFoundError):
        store.map("missing.bin")
    assert LocalStore(tmp_path, map_reads=False).map("a.bin") is None
    assert open_store(str(tmp_path), map_reads=False).map("a.bin") is None
    for bad in ("false", 0, None):  # not a bool: refused, never read as True or False
        with pytest.raises(ConfigError, match="map_reads must be True or False"):
            open_store(str(tmp_path), map_reads=bad)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_written_files_leave_the_page_cache_once_durable(tmp_path):
    """A collection writes more than memory: what it fsynced is dropped from the cache, not kept."""
    data = os.urandom(4 << 20)
    LocalStore(tmp_path).put("a.bin", data)
    assert cached_pages(tmp_path / "a.bin") == 0
    LocalStore(tmp_path, fsync=False).put("b.bin", data)  # not durable yet: the cache holds it
    assert cached_pages(tmp_path / "b.bin") == (4 << 20) // 4096
    assert (tmp_path / "a.bin").read_bytes() == data


@pytest.mark.skipif(not LocalStore(".").map_reads, reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")
def test_populate_reads_in_the_range_asked_and_names_what_it_cannot(tmp_path):
    data = os.urandom(64 << 10)
    LocalStore(tmp_path, fsync=False).put("a.bin", data)
    mapping = LocalStore(tmp_path).map("a.bin")
    assert mapping is not None
    try:
        populate(mapping, 100, len(data))  # not page-aligned: from its page on
        populate(mapping, 5, 5)  # nothing asked: nothing read
        assert cached_pages(tmp_path / "a.bin") == 16 and bytes(mapping[:16]) == data[:16]
        for start, end in ((-1, 10), (10, 5), (0, len(data) + 1)):
            with pytest.raises(ValueError, match="outside a mapping"):
                populate(mapping, start, end)
        os.truncate(tmp_path / "a.bin", 8192)  # shortened in place after it was mapped
        with pytest.raises(OSError) as info:
            populate(mapping, 0, len(data))  # an error where touching the lost pages is SIGBUS
        assert info.value.errno == errno.EFAULT
    finally:
        mapping.close()
