"""The store interface every byte goes through: objects under one root, `/`-separated keys.

Backends: `LocalStore` (storage/local.py, the default) and `S3Store` (storage/s3.py); a URI picks
one (storage/uri.py). `put` is atomic in both: a reader sees the whole object or none of it.
A reader that reads an object in several requests opens it (`Store.open`): every read of the
`ObjectHandle` sees one version of it, or raises ObjectChanged, never a mix of two.
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

from activault.errors import NotFoundError, StorageError

Buffer = bytes | bytearray | memoryview
# The store's own bookkeeping in a run (collector locks): never listed, like local dot-files.
LOCKS = ".locks"
EntryKind = Literal["file", "link", "special", "badkey"]
# Attempts at reading one whole version of an object that writers keep replacing (recompress
# rewrites each file once, so a second attempt reads the new version).
REREADS = 3


@dataclass(frozen=True)
class Entry:
    """One listed object. Only a "file" is ever read; the other kinds are listed so that tools can
    name and delete them: "link" a symbolic link (local; never followed), "special" a FIFO, device
    or socket (local), "badkey" an S3 key with an empty, `.` or `..` segment (activault never writes one).
    """

    key: str
    size: int
    kind: EntryKind = "file"


class ObjectChanged(StorageError):
    """The version being read was replaced (or is not the size it was listed with): read it again,
    from the start, through a new `Store.open`."""


class ObjectHandle(ABC):
    """One version of one object: `size` and every read are that version's, whatever is written
    to the key meanwhile; a read raises ObjectChanged where that version is gone. Close it after
    the last read (`with`)."""

    def __init__(self, url: str, size: int, version: str | None):
        self.url = url
        self.size = size
        self.version = version  # the store's name for this version (local: inode, S3: ETag); None: unknown
        self.closed = False

    @abstractmethod
    def read_into(self, offset: int, out: memoryview) -> int:
        """Fill `out` with this version's bytes from `offset`; return how many (short at its end)."""

    def read(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) of this version (short at its end)."""
        view = memoryview(bytearray(max(0, end - start)))
        return view[: self.read_into(start, view)] if view.nbytes else view

    def map(self) -> mmap.mmap | None:
        """This version mapped copy-on-write (as `Store.map`), or None where the store cannot."""
        return None

    def close(self) -> None:
        """Let go of the version (a local file's descriptor: reads after it fail)."""
        self.closed = True

    def __enter__(self) -> ObjectHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _KeyHandle(ObjectHandle):
    """A store that cannot pin a version: each read asks for the key, and a read that ends before
    the size it was opened with asks the size again: ObjectChanged if it differs, so a file
    replaced since it was listed is never called truncated."""

    def __init__(self, store: Store, key: str, size: int):
        super().__init__(store.url(key), size, None)
        self.store, self.key = store, key

    def read_into(self, offset: int, out: memoryview) -> int:
        n = self.store.read_into(self.key, offset, out)
        if n < out.nbytes and offset + n < self.size:
            self._recheck()
        return n

    def map(self) -> mmap.mmap | None:
        mapping = self.store.map(self.key)
        if mapping is not None and len(mapping) != self.size:  # the key's file now is another
            now = len(mapping)
            mapping.close()
            raise self._changed(now)
        return mapping

    def _recheck(self) -> None:
        if (now := self.store.size(self.key)) != self.size:
            raise self._changed(now)

    def _changed(self, now: int | None) -> ObjectChanged:
        return ObjectChanged(f"{self.url} was replaced while it was read (it had {self.size} bytes, now {now})")


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

    def open(self, key: str, size: int | None = None) -> ObjectHandle:
        """One version of the object to read in several requests; NotFoundError if it is missing.

        Args:
            size: its size from a listing, which a store may use instead of asking (it then
                raises ObjectChanged at the first read if the object is no longer that size).

        This default pins no version (a store that can overrides it): it checks sizes only.
        """
        if size is None:
            size = self.size(key)
            if size is None:
                raise NotFoundError(f"{self.url(key)} does not exist")
        return _KeyHandle(self, key, size)

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
