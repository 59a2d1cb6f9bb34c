"""The page cache as tests see it: how much of a file it holds (mincore), and emptying it of one."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np


def cached_pages(path: Path) -> int:
    """How many of the file's pages the page cache holds (mincore on a mapping: reads nothing)."""
    size = path.stat().st_size
    if not size:
        return 0
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    vec = np.zeros(pages, np.uint8)
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(
            ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec.ctypes.data_as(ctypes.c_void_p)
        ):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        del anchor
        mapping.close()
    return int(np.count_nonzero(vec & 1))


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (written back first: dirty pages stay cached)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
