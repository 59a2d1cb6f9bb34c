"""storage/__init__.py: a store opened from a URI (and its options), the store of a local path (locate).

The local store is tested in test_local.py, the interface in test_base.py, URIs in test_uri.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from activault.errors import ConfigError, StorageError
from activault.storage import LocalStore, locate, open_store


def test_open_store_by_uri(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store("s3://bucket/some/prefix").url("k") == "s3://bucket/some/prefix/k"


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fsnyc": False}, r"unknown store option\(s\) 'fsnyc': the local store takes fsync, map_reads$"),
        ({"map_read": False, "fsync": True}, "'map_read': the local store takes fsync, map_reads"),
        ({"unsigned": True}, r"'unsigned' \(unsigned: for another kind of store\): the local store takes"),
        ({"env": {}, "part_size": 1}, "'env', 'part_size' .*for another kind of store"),
    ],
)
def test_an_option_the_local_store_does_not_take_is_named_with_those_it_takes(tmp_path, options, message):
    """open_store used to drop these in silence: a mistyped `fsync=False` made every write durable."""
    with pytest.raises(ConfigError, match=message):
        open_store(str(tmp_path), **options)
    assert not any(tmp_path.iterdir())  # refused before anything is made
