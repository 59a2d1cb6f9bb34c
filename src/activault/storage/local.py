"""The local filesystem store: files appear only when complete (temp name, fsync, rename).

Nothing outside the root is read, listed or deleted. Every method finds its path through one guard,
`_path`, which refuses `..`, a key no file can have (a NUL, a name over 255 bytes, a path over 4096;
for a write, the root itself) before touching the filesystem, and any symbolic link between the root
and the key's last part; the last part is examined with `lstat`, so a link is never followed: it is
listed as a link, reads of it are refused, and `delete` removes the link itself. Only regular files
are opened (a FIFO or a device would block or never end), with O_NOFOLLOW and O_NONBLOCK, and
checked again once open. The root itself may be a link: it is the user's choice of folder.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import functools
import mmap
import os
import stat
import sys
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

from activault.errors import ConfigError, NotFoundError, StorageError, shown
from activault.storage.base import Buffer, Entry, EntryKind, ObjectHandle, Store, as_parts, join, populate

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> EntryKind | None:
    """What a listing calls a path of this mode; None for a folder."""
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISREG(mode):
        return "file"
    return "link" if stat.S_ISLNK(mode) else "special"


class LocalStore(Store):
    """A folder on the local filesystem; files appear only when complete (temp name, fsync, rename)."""

    def __init__(self, root: str | Path, fsync: bool = True, map_reads: bool = True):
        for name, value in (("fsync", fsync), ("map_reads", map_reads)):
            if not isinstance(value, bool):  # a string such as "false" would count as True
                raise ConfigError(f"local store option {name} must be True or False, got {value!r}")
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        # The guard works on strings: pathlib costs ~10 us per key, a third of a mapped file's open.
        self._prefix = self.uri.rstrip(os.sep) + os.sep
        self._root_bytes = len(os.fsencode(self.root))
        self.fsync = fsync
        # Readers map files instead of copying them (`map`): one copy fewer from the page cache.
        self.map_reads = map_reads and _can_populate()

    # ---- the guard ----

    def _path(self, key: str, write: bool = False) -> Path:
        """The path of `key`, before the filesystem is touched; StorageError for a key no file can
        have (`_key_problem`), one that names the root itself for a write, or a symbolic link on
        the way to its last part."""
        return Path(self._guard(key, write))

    def _guard(self, key: str, write: bool = False) -> str:
        """`_path` as a string (the root itself: `uri`)."""
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise StorageError(f"key {shown(key)} escapes the store root {self.root}")
        if problem := _key_problem(key, parts, self._root_bytes, write):
            raise StorageError(f"key {shown(key)} cannot be a file of the local store {self.root}: {problem}")
        if not parts:
            return self.uri
        path = self._prefix
        for part in parts[:-1]:
            path += part
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                break  # the rest does not exist, so it holds no link
            if stat.S_ISLNK(mode):
                raise self._link_error(path)
            path += os.sep
        return self._prefix + os.sep.join(parts)

    def _lstat(self, key: str) -> tuple[Path, os.stat_result | None]:
        path, st = self._lstat_str(key)
        return Path(path), st

    def _lstat_str(self, key: str) -> tuple[str, os.stat_result | None]:
        path = self._guard(key)
        try:
            # The root is stat'ed through: it may be a link the user chose.
            return path, os.stat(path) if path == self.uri else os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return path, None

    def _link_error(self, path: Path | str) -> StorageError:
        return StorageError(
            f"{path} is a symbolic link; the store never follows links, so nothing outside {self.root} is "
            "reachable: put the real file or folder there, or delete the link (`rm` deletes the link itself)"
        )

    def _not_a_file(self, path: Path | str, st: os.stat_result | None) -> StorageError | None:
        """Why `path` cannot be read as a file, or None if it can."""
        if st is None:
            return NotFoundError(f"{path} does not exist")
        kind = _kind(st.st_mode)
        if kind is None:
            return NotFoundError(f"{path} is a folder, not a file")
        if kind == "link":
            return self._link_error(path)
        if kind == "special":
            return StorageError(f"{path} is not a regular file (a FIFO, device or socket); activault reads only files")
        return None

    def _open(self, key: str) -> tuple[str, int, os.stat_result]:
        """(path, read-only descriptor, its fstat) of a regular file: never a link, FIFO or device."""
        path, st = self._lstat_str(key)
        if (err := self._not_a_file(path, st)) is not None:
            raise err
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise NotFoundError(f"{path} does not exist") from None
        except OSError as e:  # e.g. ELOOP: replaced by a link since the lstat
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
        st = os.fstat(fd)
        if (err := self._not_a_file(path, st)) is not None:
            os.close(fd)
            raise err
        return path, fd, st

    def _check_range(self, key: str, start: int, end: int) -> None:
        # preadv reads offset -1 as "the current position": a negative start would read other bytes.
        if not 0 <= start <= end:
            raise StorageError(
                f"bytes [{start}, {end}) of {self.url(key)} are not a range: a read needs 0 <= start <= end"
            )

    def path_of(self, key: str) -> Path:
        """The filesystem path of `key`, through the guard (no `..`, no link on the way)."""
        return self._path(key)

    # ---- the store ----

    def check(self, write: bool = False) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot create the local store {self.root}: {e.strerror}; choose a writable path with --storage"
            ) from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"the local store {self.root} is not writable; choose another path with --storage")

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        path = self._path(key, write=True)
        # Hidden temp names are skipped by list(): a reader never sees a partial file. The rename
        # replaces a link at `path` rather than writing through it.
        tmp = _temp_name(path)
        try:
            self._write(tmp, data)
            os.replace(tmp, path)
        except OSError as e:
            _discard(tmp)
            raise StorageError(
                f"cannot write {path}: {e.strerror or e}; free space or fix permissions (or choose another "
                "--storage), then run the same command again to resume"
            ) from e

    def _write(self, path: Path, data: Buffer | Sequence[Buffer]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # a new name: never a link
        try:
            for part in as_parts(data):
                view = part.cast("B") if part.format != "B" or part.ndim != 1 else part
                while view.nbytes:
                    n = os.write(fd, view)
                    view = view[n:]
            if self.fsync:
                os.fsync(fd)
                # Written pages are clean now: drop them from the page cache. A collection writes
                # far more than memory, and keeping what it wrote would evict what is read (the
                # model, the data); new cached pages also cost a first touch each (~15x the CPU of
                # writing into reused ones, docs/benchmarks.md), taken from the model.
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        path = self._path(key, write=True)
        try:
            if expect is None:
                return self._create(path, data)
            return self._replace(key, path, data, expect)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}; fix it, run again") from e

    def _create(self, path: Path, data: bytes) -> bool:
        # link() of a complete temp file fails if the name exists: create-if-absent, never partial.
        tmp = _temp_name(path)
        try:
            self._write(tmp, data)
            try:
                os.link(tmp, path)
            except OSError as e:
                if e.errno not in _NO_LINKS:
                    raise
                # A filesystem without hard links (some FUSE mounts): check, then rename. Not atomic
                # against a second creator, but the local collector holds the machine's flock.
                if os.path.lexists(path):
                    return False
                os.rename(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            _discard(tmp)

    def _replace(self, key: str, path: Path, data: bytes, expect: bytes) -> bool:
        while True:
            try:
                _, fd, _ = self._open(key)  # a regular file, never through a link
            except NotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.lstat(path).st_ino != os.fstat(fd).st_ino:
                        continue  # replaced while we waited: compare with the new one
                except FileNotFoundError:
                    return False
                with open(fd, "rb", closefd=False) as f:
                    if f.read() != expect:
                        return False
                self.put(key, data)  # a new inode renamed in place, while the old one is locked
                return True
            finally:
                os.close(fd)

    def get(self, key: str) -> memoryview:
        path, fd, st = self._open(key)
        try:
            view = memoryview(bytearray(st.st_size))
            return view[: self._read(path, fd, 0, view)]
        finally:
            os.close(fd)

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        self._check_range(key, start, end)
        with self.open(key) as obj:
            # Sized to what the file holds: a record's first read asks for 1 MiB (records.FIRST_READ),
            # whose fresh pages cost more than reading a record of a few KB (0.4 ms a record here).
            view = memoryview(bytearray(max(0, min(end, obj.size) - start)))
            return view[: obj.read_into(start, view)]

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        self._check_range(key, offset, offset + out.nbytes)
        with self.open(key) as obj:
            return obj.read_into(offset, out)

    def open(self, key: str, size: int | None = None) -> ObjectHandle:
        """The file as it is now, held open: a file renamed over it later (every write) leaves
        the open one whole, so every read sees one version. `size` is not needed (fstat)."""
        return _LocalFile(self, key, *self._open(key))

    @staticmethod
    def _read(path: Path | str, fd: int, offset: int, out: memoryview) -> int:
        got = 0
        try:
            while got < out.nbytes:
                n = os.preadv(fd, [out[got:]], offset + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
        return got

    def map(self, key: str) -> mmap.mmap | None:
        """The file mapped copy-on-write, through the same guard as reads (a regular file, never a
        link); None for an empty file, a filesystem that cannot map, or `map_reads=False`.

        A file truncated in place while mapped makes touching its lost pages raise SIGBUS: read
        them with `populate` (an error instead) before touching them. activault never truncates
        a stored file (every write is a new file renamed over the old one, whose mapping stays).
        """
        if not self.map_reads:
            return None
        with self.open(key) as obj:
            return obj.map()

    def size(self, key: str) -> int | None:
        path, st = self._lstat(key)
        if st is None or stat.S_ISDIR(st.st_mode):
            return None
        if (err := self._not_a_file(path, st)) is not None:
            raise err
        return st.st_size

    def list(self, prefix: str = "") -> list[Entry]:
        path, st = self._lstat(prefix)
        if st is None:
            return []
        key = "/".join(path.relative_to(self.root).parts)
        kind = _kind(st.st_mode)
        if kind is not None:
            return [Entry(key, st.st_size if kind == "file" else 0, kind)]
        return sorted(self._walk(path, key), key=lambda e: e.key)

    def _walk(self, folder: Path, key: str) -> Iterator[Entry]:
        """Every entry below `folder`, without entering linked folders; hidden names (temp files) skipped."""
        subfolders = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed while listing
                        continue
                    kind = _kind(st.st_mode)
                    if kind is None:
                        subfolders.append(e.name)
                    else:
                        yield Entry(join(key, e.name), st.st_size if kind == "file" else 0, kind)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in subfolders:
            yield from self._walk(folder / name, join(key, name))

    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[Entry]]:
        path, st = self._lstat(prefix)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise self._link_error(path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return [], []
        key = "/".join(path.relative_to(self.root).parts)
        dirs, files = [], []
        for e in os.scandir(path):
            if e.name.startswith("."):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind = _kind(st.st_mode)
            if kind is None:
                dirs.append(e.name)
            else:
                files.append(Entry(join(key, e.name), st.st_size if kind == "file" else 0, kind))
        return sorted(dirs), sorted(files, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        """Remove a file, link (not its target), FIFO or device; a folder is an error."""
        path, st = self._lstat(key)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{path} is a folder; delete the files in it (empty folders then go)")
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot delete {path}: {e.strerror or e}") from e
        # Drop folders left empty, up to the root, so deleted runs vanish from listings. The guard
        # checked that none of them is a link.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def clear_partial(self, folder: str, name_prefix: str) -> int:
        # Temp files are `.{name}.{random}.tmp` (see put); a killed writer leaves its own behind.
        base, st = self._lstat(folder)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return 0
        stale = list(base.glob(f".{name_prefix}*.tmp"))
        try:
            for p in stale:
                p.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot remove the unfinished file {p} left by an earlier attempt: "
                f"{e.strerror or e}; make the filesystem writable (or choose another --storage), "
                "then run the same command again"
            ) from e
        return len(stale)


class _LocalFile(ObjectHandle):
    """One version of a local file: its descriptor, held until closed (or collected)."""

    def __init__(self, store: LocalStore, key: str, path: str, fd: int, st: os.stat_result):
        super().__init__(store.url(key), st.st_size, f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}")
        self.store, self.key, self.path, self.fd = store, key, path, fd
        # A reader abandoned mid-file (an error elsewhere) may still have reads in flight: the
        # descriptor is closed when the last of them lets go of this handle, or by close().
        self._closer = weakref.finalize(self, os.close, fd)

    def read_into(self, offset: int, out: memoryview) -> int:
        self.store._check_range(self.key, offset, offset + out.nbytes)
        # Straight into the caller's buffer (os.preadv releases the GIL): no intermediate copy.
        return LocalStore._read(self.path, self._fd(), offset, out)

    def map(self) -> mmap.mmap | None:
        """None for an empty file, a filesystem that cannot map, or `map_reads=False`."""
        if not self.store.map_reads or not self.size:
            return None
        try:  # the mapping keeps the file (a descriptor of its own): close this handle at will
            return mmap.mmap(self._fd(), self.size, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):  # ENODEV and the like (this filesystem does not map), or
            return None  # truncated in place since it was opened: read it instead (and find it short)

    def close(self) -> None:
        super().close()
        self._closer()

    def _fd(self) -> int:
        if not self._closer.alive:  # its number may be another file's by now
            raise StorageError(f"{self.url} was read after it was closed")
        return self.fd


@functools.cache
def _can_populate() -> bool:
    """Whether this kernel populates mappings (Linux >= 5.14); elsewhere files are read, not mapped."""
    if not sys.platform.startswith("linux"):
        return False
    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        populate(probe, 0, mmap.PAGESIZE)
        return True
    except OSError:
        return False
    finally:
        probe.close()


# Linux's limits, which macOS and the common filesystems share: bytes in one name, and in a whole
# path with its terminating NUL. A key beyond them is refused by name, not by a raw OSError.
NAME_MAX, PATH_MAX = 255, 4096
# A write's temp name adds `.` and `.{8 hex}.tmp` to the key's last part (see put).
_TEMP_EXTRA = len(".") + len(".12345678.tmp")


def _key_problem(key: str, parts: list[str], root_bytes: int, write: bool) -> str | None:
    """Why no file can be named `key` below a root of `root_bytes` (or, with `write`, be written
    there), or None."""
    if "\0" in key:
        return "it holds a NUL character, which no file name can"
    if write and not parts:
        return "it names the store root itself, not a file in it"
    try:
        # An ASCII name is its own encoding in every file-name encoding Python uses.
        sizes = [len(p) for p in parts] if key.isascii() else [len(os.fsencode(p)) for p in parts]
        total = root_bytes + sum(sizes) + len(sizes)
    except UnicodeEncodeError as e:  # a lone surrogate: no bytes on this filesystem
        return f"character {e.object[e.start : e.end]!r} has no encoding in file names ({e.encoding})"
    extra = _TEMP_EXTRA if write else 0
    room = f" ({NAME_MAX - extra} for a write, which adds {extra} to it for its temp name)" if write else ""
    for part, n in zip(parts, sizes, strict=True):
        if n > NAME_MAX - extra:
            return f"its part {shown(part)} is {n} bytes; a file name holds at most {NAME_MAX}{room}: shorten it"
    if total + extra >= PATH_MAX:
        return f"its path is {total} bytes, and a path holds fewer than {PATH_MAX}: use shorter names or fewer folders"
    return None


# What link() says on a filesystem that has no hard links.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _discard(tmp: Path) -> None:
    """Remove a temp file after a failed write; the write's error is the one worth reporting."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # e.g. the filesystem turned read-only: the next run's clear_partial retries it
