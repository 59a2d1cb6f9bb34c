"""The store interface every byte goes through: objects under one root, `/`-separated keys.

Backends: `LocalStore` (storage/local.py, the default) and `S3Store` (storage/s3.py); a URI picks
one (storage/uri.py). `put` is atomic in both: a reader sees the whole object or none of it.
"""

from __future__ import annotations

import builtins
import ctypes
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Buffer = bytes | bytearray | memoryview
# The store's own bookkeeping in a run (collector locks): never listed, like local dot-files.
LOCKS = ".locks"
EntryKind = Literal["file", "link", "special", "badkey"]


@dataclass(frozen=True)
class Entry:
    """One listed object. Only a "file" is ever read; the other kinds are listed so that tools can
    name and delete them: "link" a symbolic link (local; never followed), "special" a FIFO, device
    or socket (local), "badkey" an S3 key with an empty, `.` or `..` segment (activault never writes one).
    """

    key: str
    size: int
    kind: EntryKind = "file"


def as_parts(data: Buffer | Sequence[Buffer]) -> list[memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        return [memoryview(data)]
    return [memoryview(p) for p in data]


class Store(ABC):
    """Objects under one root, addressed by `/`-separated keys."""

    uri: str

    @abstractmethod
    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write an object atomically from one buffer or several (concatenated, not copied first)."""

    @abstractmethod
    def get(self, key: str) -> memoryview:
        """The whole object; raises NotFoundError if missing."""

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> memoryview:
        """Bytes [start, end) of an object."""

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        """Fill `out` with the object's bytes from `offset`; return how many were read (short at EOF)."""
        data = self.get_range(key, offset, offset + out.nbytes)
        out[: data.nbytes] = data
        return data.nbytes

    def map(self, key: str) -> mmap.mmap | None:
        """The whole object mapped into memory copy-on-write (writes to it never reach the store),
        or None where the store cannot map it (object stores, an empty file). Pages are read when
        first touched, or ahead with `populate`."""
        return None

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None if the object does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[Entry]:
        """Every object under `prefix` (recursive), sorted by key."""

    @abstractmethod
    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[Entry]]:
        """Immediate sub-folders (names) and objects directly under `prefix`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object (no error if it is already gone)."""

    @abstractmethod
    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        """Write a small object only if it now holds exactly `expect` (None: only if it is absent).

        Atomic against every other `swap` of the key (a conditional write); says whether it wrote.
        """

    @abstractmethod
    def check(self, write: bool = False) -> None:
        """Fail now, with a clear message, if the store cannot be reached (or, with `write`, written)."""

    def url(self, key: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def get_text(self, key: str) -> str:
        return bytes(self.get(key)).decode()

    def put_text(self, key: str, text: str) -> None:
        self.put(key, text.encode())

    def clear_partial(self, folder: str, name_prefix: str) -> int:
        """Remove leftovers of writes that were killed mid-way (only the local store has any)."""
        return 0


# MADV_POPULATE_READ (Linux 5.14): fault a range in with one call, or fail with EFAULT where the
# file no longer reaches (never SIGBUS, as touching such a page would).
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "madvise") else None
    except (OSError, TypeError):  # no C library to ask (not Linux or macOS)
        return None


# madvise through ctypes, which lets go of the GIL: `mmap.madvise` holds it for the whole call
# (0.5-2.5 ms per 64 MiB from the page cache, a disk read from a cold one), and the consumer's
# thread would wait on it.
_LIBC = _libc()


def populate(mapping: mmap.mmap, start: int, end: int) -> None:
    """Read bytes [start, end) of a `Store.map` mapping into memory now, on this thread.

    Raises OSError: EFAULT where the file is shorter than the mapping (shrunk since it was
    mapped), EIO for a read error, EINVAL where the kernel cannot populate (then `map` is None).
    """
    if not 0 <= start <= end <= len(mapping):
        raise ValueError(f"bytes [{start}, {end}) are outside a mapping of {len(mapping)}")
    a = start - start % mmap.PAGESIZE
    if end <= a:
        return
    if _LIBC is None:
        mapping.madvise(_POPULATE_READ, a, end - a)
        return
    anchor = ctypes.c_char.from_buffer(mapping)  # its address; released before anyone closes it
    try:
        failed = _LIBC.madvise(
            ctypes.c_void_p(ctypes.addressof(anchor) + a), ctypes.c_size_t(end - a), ctypes.c_int(_POPULATE_READ)
        )
    finally:
        del anchor
    if failed:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
