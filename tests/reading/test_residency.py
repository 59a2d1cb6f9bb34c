"""What of a mapped file the page cache holds: asked of the kernel, checked against mincore's full answer."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from activault.reading import residency
from support.pagecache import cached_pages, evict


def _mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def test_the_share_follows_what_the_page_cache_holds(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(256 * mmap.PAGESIZE))  # 256 pages: every 4th is probed
    path.read_bytes()
    mapping = _mapped(path)
    try:
        assert cached_pages(path) == 256 and residency.resident(mapping) == 1.0
        evict(path)
        fd = os.open(path, os.O_RDONLY)
        try:  # the first half read back with read-ahead off: exactly pages [0, 128) cached, where eviction works
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 128 * mmap.PAGESIZE, 0)
        finally:
            os.close(fd)
        cached = cached_pages(path)  # measured: 128 on disk filesystems, 256 on tmpfs (nothing leaves it)
        assert cached in (128, 256)
        assert residency.resident(mapping) == cached / 256
        assert residency.resident(mapping, samples=1) == 1.0  # the first page alone
    finally:
        mapping.close()  # the probe let go of the mapping's buffer


def test_without_mincore_a_file_counts_as_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(3 * mmap.PAGESIZE))
    evict(path)
    monkeypatch.setattr(residency, "_LIBC", None)
    mapping = _mapped(path)
    try:
        assert residency.resident(mapping) == 1.0  # mapped, as before the probe existed
    finally:
        mapping.close()
