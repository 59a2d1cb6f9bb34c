"""storage/base.py: the store interface's shared behaviour (defaults every backend inherits, buffers
written without copies, key joining) and `populate`, which reads a mapping in or fails, never SIGBUS."""

from __future__ import annotations

import errno
import os

import pytest

from activault.errors import NotFoundError
from activault.storage import LocalStore
from activault.storage.base import Entry, ObjectChanged, Store, as_parts, join, populate
from support.pagecache import cached_pages


class MemoryStore(Store):
    """The smallest store: only the abstract methods, so every default of `Store` is the one tested."""

    def __init__(self, uri: str = "mem://root/"):
        self.uri = uri
        self.objects: dict[str, bytes] = {}
        self.ranges: list[tuple[str, int, int]] = []

    def put(self, key, data):
        self.objects[key] = b"".join(bytes(p) for p in as_parts(data))

    def get(self, key):
        if key not in self.objects:
            raise NotFoundError(key)
        return memoryview(self.objects[key])

    def get_range(self, key, start, end):
        self.ranges.append((key, start, end))
        return self.get(key)[start:end]

    def size(self, key):
        return len(self.objects[key]) if key in self.objects else None

    def list(self, prefix=""):
        return [Entry(k, len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix)]

    def list_dir(self, prefix=""):
        return [], self.list(prefix)

    def delete(self, key):
        self.objects.pop(key, None)

    def swap(self, key, data, expect):
        if self.objects.get(key) != expect:
            return False
        self.objects[key] = data
        return True

    def check(self, write=False):
        pass


def test_a_store_must_implement_the_whole_interface():
    class Partial(Store):
        def put(self, key, data):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


def test_default_read_into_fills_the_buffer_from_one_ranged_read_and_is_short_at_the_end():
    store = MemoryStore()
    store.put("k", b"0123456789")
    out = memoryview(bytearray(4))
    assert store.read_into("k", 3, out) == 4 and bytes(out) == b"3456"
    assert store.ranges == [("k", 3, 7)]
    out = memoryview(bytearray(b"xxxxxx"))
    assert store.read_into("k", 7, out) == 3 and bytes(out) == b"789xxx", "only what exists is written"
    assert store.read_into("k", 10, memoryview(bytearray(2))) == 0


def test_default_helpers():
    store = MemoryStore("mem://root/")
    assert store.map("anything") is None, "object stores do not map"
    assert store.url() == "mem://root/" and store.url("run/cfg.json") == "mem://root/run/cfg.json"
    assert not store.exists("t")
    store.put_text("t", "héllo ✓")
    assert store.exists("t") and store.objects["t"] == "héllo ✓".encode()
    assert store.get_text("t") == "héllo ✓"
    assert store.clear_partial("run/h", "m00000-") == 0
    store.put("bin", b"\xff\xfe")
    with pytest.raises(UnicodeDecodeError):
        store.get_text("bin")


def test_the_default_open_calls_a_replaced_object_changed_never_short():
    """A store that cannot pin a version: a read that ends before the size the object was opened
    (or listed) with asks the size again, and a different size is ObjectChanged, not a truncation."""
    store = MemoryStore()
    store.put("k", b"0123456789")
    obj = store.open("k")  # no listed size: asked
    assert (obj.size, obj.version, obj.url) == (10, None, "mem://root/k")
    assert bytes(obj.read(2, 6)) == b"2345" and store.ranges[-1] == ("k", 2, 6)
    assert bytes(obj.read(8, 20)) == b"89", "short at its own end: no question"
    listed = store.open("k", size=10)  # listed: not asked
    store.put("k", b"01234")  # replaced by a shorter one since it was listed
    with pytest.raises(ObjectChanged, match="mem://root/k was replaced while it was read"):
        listed.read(0, 10)
    store.put("k", b"abcdefghij")  # the same size again: reads go on, nothing to tell
    assert bytes(listed.read(0, 10)) == b"abcdefghij"
    with listed as same:
        assert same is listed and same.map() is None  # this store maps nothing
    with pytest.raises(NotFoundError, match="mem://root/gone does not exist"):
        store.open("gone")


def test_put_accepts_one_buffer_or_several_without_copying_them():
    a, b, c = b"ab", bytearray(b"cd"), memoryview(b"xefx")[1:3]
    parts = as_parts([a, b, c])
    assert [bytes(p) for p in parts] == [b"ab", b"cd", b"ef"]
    assert parts[0].obj is a and parts[1].obj is b and parts[2].obj is c.obj, "views, not copies"
    for one in (a, b, c):
        (only,) = as_parts(one)
        assert bytes(only) == bytes(one) and only.obj is (one.obj if isinstance(one, memoryview) else one)
    assert as_parts([]) == []
    store = MemoryStore()
    store.put("k", [a, b, c])
    assert store.get_text("k") == "abcdef"


@pytest.mark.parametrize(
    "parts,key",
    [
        (("run", "hook", "m.safetensors"), "run/hook/m.safetensors"),
        (("run/", "/hook/", "/m"), "run/hook/m"),
        (("", "run", "", "m"), "run/m"),
        (("/", "run"), "run"),
        (("a/b", "c/d"), "a/b/c/d"),
        ((), ""),
        (("",), ""),
    ],
)
def test_join_makes_one_key_without_empty_segments_at_the_joins(parts, key):
    assert join(*parts) == key


def test_entries_are_files_unless_said_otherwise_and_immutable():
    e = Entry("run/cfg.json", 2)
    assert e.kind == "file"
    with pytest.raises(AttributeError):
        e.size = 3  # type: ignore[misc]


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
