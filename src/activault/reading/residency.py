"""How much of a mapped file the page cache holds, asked without reading it (mincore)."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

# Pages probed per file: 0.13 ms for 64 on this project's VM, against 4-6 ms to ask for every page
# of a 256 MiB file (65,536 pages), a tenth of reading it from the page cache.
SAMPLES = 64


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "mincore") else None
    except (OSError, TypeError):  # no C library to ask
        return None


_LIBC = _libc()


def resident(mapping: mmap.mmap, samples: int = SAMPLES) -> float:
    """The share of `samples` pages, evenly spread over a file mapping, that the page cache holds;
    1.0 where the system cannot say (the caller then treats the file as cached)."""
    pages = -(-len(mapping) // mmap.PAGESIZE)
    n = min(samples, pages)
    if _LIBC is None or not n:
        return 1.0
    anchor = ctypes.c_char.from_buffer(mapping)  # its address; released before anyone closes it
    try:
        base, vec, held = ctypes.addressof(anchor), ctypes.c_ubyte(), 0
        for i in range(n):
            at = ctypes.c_void_p(base + i * pages // n * mmap.PAGESIZE)
            if _LIBC.mincore(at, ctypes.c_size_t(mmap.PAGESIZE), ctypes.byref(vec)):
                return 1.0
            held += vec.value & 1
    finally:
        del anchor
    return held / n
