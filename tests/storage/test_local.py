"""storage/local.py: files appear only when complete, nothing outside the root is reached (no `..`, no
link followed, no FIFO or device opened), write errors name the fix, reads go straight into buffers."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from activault.errors import ConfigError, NotFoundError, StorageError
from activault.storage import Entry, LocalStore, open_store
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


# ---- links, FIFOs and devices: nothing outside the root is reachable ----


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


# ---- atomic writes, observed while they happen ----


@pytest.fixture
def mid_write(monkeypatch):
    """Run `probe()` from inside the store's writes, after the first chunk of each put reached the disk."""
    probes = []
    real_write = os.write

    def write(fd, data):
        n = real_write(fd, data[:3])  # a short write: the store must loop until all is written
        for probe in probes:
            probe()
        return n

    monkeypatch.setattr(os, "write", write)
    return probes.append


def test_a_file_being_written_is_invisible_until_complete(local, mid_write):
    seen = []
    mid_write(lambda: seen.append((local.exists("run/a.bin"), [e.key for e in local.list()])))
    local.put("run/a.bin", [b"0123456789", memoryview(b"abcdef")])
    assert seen and all(s == (False, []) for s in seen), "no partial file is ever visible or listed"
    assert local.get_text("run/a.bin") == "0123456789abcdef"


def test_a_file_being_replaced_reads_whole_old_until_the_new_one_is_complete(local, mid_write):
    local.put("cfg.json", b'{"old": true}')
    seen = []
    mid_write(lambda: seen.append(local.get_text("cfg.json")))
    local.put("cfg.json", b'{"new": "a longer record"}')
    assert seen and set(seen) == {'{"old": true}'}
    assert local.get_text("cfg.json") == '{"new": "a longer record"}'


def test_an_opened_file_reads_one_version_while_a_new_one_is_renamed_over_it(local):
    """`open` holds the version it found: its size, reads and mapping stay the old file's after a
    put (temp name + rename) of a different size, and a new `open` finds the new one."""
    old, new = os.urandom(10_000), os.urandom(3_000)
    local.put("run/h/m.safetensors", old)
    with local.open("run/h/m.safetensors", size=123) as obj:  # a listed size is not needed locally
        assert obj.size == len(old) and obj.version is not None
        head = obj.read(0, 100)
        local.put("run/h/m.safetensors", new)  # replaced between the header and the body
        assert bytes(head) + bytes(obj.read(100, len(old))) == old
        out = memoryview(bytearray(len(old) + 10))
        assert obj.read_into(0, out) == len(old) and bytes(out[: len(old)]) == old  # short at its own end
        mapping = obj.map()
        if local.map_reads:
            assert mapping is not None and bytes(mapping) == old
        with local.open("run/h/m.safetensors") as now:
            assert now.size == len(new) and now.version != obj.version and bytes(now.read(0, now.size)) == new
    with pytest.raises(StorageError):  # closed: its descriptor is gone
        obj.read(0, 10)
    with pytest.raises(NotFoundError):
        local.open("run/h/missing")


def test_a_write_failing_midway_leaves_the_old_file_and_no_temp_file(local, monkeypatch):
    local.put("run/h/m.bin", b"complete old bytes")
    real_write = os.write
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data[:4])

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageError, match="cannot write .*No space left on device.*free space"):
        local.put("run/h/m.bin", b"new bytes that will not fit")
    monkeypatch.undo()
    assert local.get_text("run/h/m.bin") == "complete old bytes"
    assert sorted(os.listdir(local.root / "run/h")) == ["m.bin"]


def test_typed_buffers_are_written_as_their_bytes(local):
    import array

    ints = array.array("i", [1, -2, 3])
    local.put("ints", memoryview(ints))
    assert bytes(local.get("ints")) == ints.tobytes()


# ---- keys ----


@pytest.mark.parametrize("key", ["..", "../x", "a/../../x", "a/..", "run/./../..", "../", "x/../y"])
def test_dot_dot_anywhere_in_a_key_is_refused_before_any_write(tmp_path, key):
    store = LocalStore(tmp_path / "root", fsync=False)
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.size(key),
        lambda: store.list(key),
        lambda: store.delete(key),
        lambda: store.swap(key, b"x", None),
    ):
        with pytest.raises(StorageError, match="escapes the store root"):
            call()
    assert list(tmp_path.rglob("*")) == [], "nothing created, inside or outside"


LONG = "x" * 256  # one byte over a file name's 255


@pytest.mark.parametrize(
    "key,problem",
    [
        ("a\0b", "holds a NUL character"),
        ("run/\0", "holds a NUL character"),
        (LONG, "is 256 bytes; a file name holds at most 255"),
        (f"run/{LONG}/h", "is 256 bytes; a file name holds at most 255"),
        ("ü" * 128, "is 256 bytes"),  # bytes, not characters
        ("/".join(["y" * 200] * 21), "a path holds fewer than 4096"),
        ("bad\ud800", "has no encoding in file names"),
    ],
)
def test_a_key_no_file_can_have_is_one_error_from_every_method(tmp_path, key, problem):
    store = LocalStore(tmp_path / "root", fsync=False)
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.swap(key, b"x", None),
        lambda: store.get(key),
        lambda: store.get_range(key, 0, 1),
        lambda: store.read_into(key, 0, memoryview(bytearray(1))),
        lambda: store.map(key),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: store.list(key),
        lambda: store.list_dir(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(StorageError, match="cannot be a file of the local store") as e:
            call()
        assert problem in str(e.value)
        assert len(key) <= 120 or key not in str(e.value), "a long key is shown cut"
    assert list(tmp_path.rglob("*")) == [], "nothing created, inside or outside"


def test_a_write_leaves_room_in_the_name_for_its_temp_file(local):
    readable = "r" * 255  # another tool may have written it: it is read, listed and deleted
    (local.root / readable).write_bytes(b"x")
    assert bytes(local.get(readable)) == b"x" and local.size(readable) == 1
    assert [e.key for e in local.list()] == [readable]
    with pytest.raises(StorageError, match="at most 255 \\(241 for a write, which adds 14"):
        local.put(readable, b"y")  # `.{name}.{8 hex}.tmp` would not fit
    local.put("w" * 241, b"y")
    local.delete(readable)
    assert [e.key for e in local.list()] == ["w" * 241]


@pytest.mark.parametrize("key", ["", ".", "/", "./", "//."])
def test_a_write_to_the_root_itself_is_refused_before_any_write(tmp_path, key):
    # It used to write its temp file beside the root, outside the store, before failing.
    store = LocalStore(tmp_path / "root", fsync=False)
    store.check()
    for call in (lambda: store.put(key, b"x"), lambda: store.swap(key, b"x", None)):
        with pytest.raises(StorageError, match="names the store root itself"):
            call()
    assert [p.name for p in tmp_path.rglob("*")] == ["root"] and store.list(key) == []


def test_empty_and_dot_segments_name_the_same_key(local):
    local.put("run//h/./a.bin", b"x")
    assert local.get_text("run/h/a.bin") == "x" and [e.key for e in local.list()] == ["run/h/a.bin"]
    assert local.list("./run/") == local.list("run")


def test_a_file_on_the_way_to_a_key_is_not_a_folder(local):
    local.put("f", b"0123")
    with pytest.raises(NotFoundError):
        local.get("f/x")
    assert local.size("f/x") is None and local.list("f/x") == [] and local.list_dir("f") == ([], [])
    with pytest.raises(StorageError, match="cannot write"):
        local.put("f/x", b"1")
    assert local.get_text("f") == "0123"


# ---- reads, sizes, listings, deletes ----


def test_reads_go_into_the_callers_buffer_and_are_short_at_the_end(local):
    local.put("a", b"0123456789")
    out = memoryview(bytearray(b"......"))
    assert local.read_into("a", 2, out) == 6 and bytes(out) == b"234567"
    out = memoryview(bytearray(b"......"))
    assert local.read_into("a", 7, out) == 3 and bytes(out) == b"789..."
    assert local.read_into("a", 50, out) == 0
    assert bytes(local.get_range("a", 8, 100)) == b"89"
    assert bytes(local.get_range("a", 5, 5)) == b""
    assert bytes(local.get_range("a", 50, 60)) == b""
    # A range past the end allocates what the file holds, not what was asked (records ask for 1 MiB).
    assert len(local.get_range("a", 8, 1 << 30).obj) == 2


@pytest.mark.parametrize("start,end", [(-1, 3), (-5, -1), (5, 3), (0, -1)])
def test_a_range_that_is_not_one_is_refused_naming_the_key(local, start, end):
    # preadv reads offset -1 as "the current position": get_range(-1, 3) gave the first 4 bytes.
    local.put("a", b"0123456789")
    with pytest.raises(StorageError, match=r"bytes \[.*\) of .*/a are not a range: a read needs 0 <= start <= end"):
        local.get_range("a", start, end)
    if start < 0:
        out = memoryview(bytearray(b"...."))
        with pytest.raises(StorageError, match="/a are not a range"):
            local.read_into("a", start, out)
        assert bytes(out) == b"...."


def test_listing_is_recursive_sorted_and_sized(local):
    for key, n in [("r/b/2", 2), ("r/a", 1), ("r/b/1/x", 3), ("s", 4)]:
        local.put(key, b"x" * n)
    assert local.list() == [Entry("r/a", 1), Entry("r/b/1/x", 3), Entry("r/b/2", 2), Entry("s", 4)]
    assert local.list("r/b") == [Entry("r/b/1/x", 3), Entry("r/b/2", 2)]
    assert local.list("r/a") == [Entry("r/a", 1)], "a file prefix lists the file"
    assert local.list("nothing") == [] and local.list_dir("nothing") == ([], [])
    assert local.list_dir("r") == (["b"], [Entry("r/a", 1)])


def test_delete_of_a_missing_key_is_no_error_and_the_root_stays(local):
    local.delete("never/was")
    local.put("only/one", b"x")
    local.delete("only/one")
    assert local.root.is_dir() and list(local.root.iterdir()) == []


def test_clear_partial_removes_only_that_prefixs_temp_files(local):
    (local.root / "h").mkdir()
    for name in (".m00000-000001.safetensors.ab.tmp", ".m00001-000001.safetensors.cd.tmp", "m00000-000000.st"):
        (local.root / "h" / name).write_bytes(b"x")
    assert local.clear_partial("h", "m00000-") == 1
    assert sorted(os.listdir(local.root / "h")) == [".m00001-000001.safetensors.cd.tmp", "m00000-000000.st"]
    assert local.clear_partial("missing", "m") == 0


@pytest.mark.parametrize("option", ["fsync", "map_reads"])
@pytest.mark.parametrize("bad", ["false", "no", 0, 1, None, [True]])
def test_options_that_are_not_booleans_are_refused(tmp_path, option, bad):
    with pytest.raises(ConfigError, match=f"local store option {option} must be True or False"):
        LocalStore(tmp_path, **{option: bad})


def test_check_creates_the_root_or_names_why_it_cannot(tmp_path):
    LocalStore(tmp_path / "new/root").check(write=True)
    assert (tmp_path / "new/root").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot create the local store .*choose a writable path"):
        LocalStore(tmp_path / "file/root").check()


# ---- swap: the one conditional write ----


def test_swap_creates_only_if_absent_and_replaces_only_what_it_expects(local):
    assert local.swap("lock", b"a", None) is True
    assert local.swap("lock", b"b", None) is False, "exists already"
    assert local.swap("lock", b"c", b"b") is False, "holds a, not b"
    assert local.swap("lock", b"d", b"a") is True
    assert local.get_text("lock") == "d"
    assert local.swap("missing", b"x", b"d") is False and not local.exists("missing")
    assert sorted(os.listdir(local.root)) == ["lock"], "no temp file left"


def test_concurrent_swaps_have_exactly_one_winner(local):
    local.put("lease", b"0")
    start = threading.Barrier(8)
    won: list[int] = []

    def contend(i: int) -> None:
        start.wait()
        if local.swap("lease", f"holder-{i}".encode(), b"0"):
            won.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and local.get_text("lease") == f"holder-{won[0]}"
    created = []
    start = threading.Barrier(8)

    def create(i: int) -> None:
        start.wait()
        if local.swap("fresh", str(i).encode(), None):
            created.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1 and local.get_text("fresh") == str(created[0])


def test_swap_creates_on_a_filesystem_without_hard_links(local, monkeypatch):
    """Some FUSE mounts refuse link(): the record is still created whole, and never over another."""

    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert local.swap("progress/a.json", b"first", None)
    assert bytes(local.get("progress/a.json")) == b"first"
    assert not local.swap("progress/a.json", b"second", None)  # exists: create-if-absent refuses
    assert bytes(local.get("progress/a.json")) == b"first"
    assert sorted(p.name for p in (local.root / "progress").iterdir()) == ["a.json"]  # no temp left


def test_opening_a_file_stats_each_part_once_and_the_descriptor_once(local, monkeypatch):
    # The per-file cost of a mapped read (docs/benchmarks.md, third session): one lstat per folder
    # on the way and of the file itself, one open, one fstat, and no second fstat for the handle.
    local.put("run/hook/f.bin", b"x" * 10)
    calls: list[str] = []
    for name in ("lstat", "stat", "fstat", "open"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with local.open("run/hook/f.bin") as obj:
        assert obj.size == 10
    assert calls == ["lstat", "lstat", "lstat", "open", "fstat"]
    calls.clear()
    assert bytes(local.get("run/hook/f.bin")) == b"x" * 10
    assert calls == ["lstat", "lstat", "lstat", "open", "fstat"]


def test_the_guards_string_paths_are_the_paths_pathlib_gives(tmp_path):
    for root in (tmp_path / "root", Path("/")):
        store = LocalStore(root, fsync=False)
        for key in ("a", "a/b/c.bin", "./a//b/", "", "/"):
            assert store.path_of(key) == root.joinpath(*[p for p in key.split("/") if p not in ("", ".")])
