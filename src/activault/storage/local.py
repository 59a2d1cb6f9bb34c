"""The local filesystem store: files appear only when complete (temp name, fsync, rename)."""

from __future__ import annotations

import builtins
import fcntl
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from activault.errors import NotFoundError, StorageError
from activault.storage.base import Buffer, Entry, Store, as_parts, join


class LocalStore(Store):
    """A folder on the local filesystem; files appear only when complete (temp name, fsync, rename)."""

    def __init__(self, root: str | Path, fsync: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        self.fsync = fsync

    def _path(self, key: str) -> Path:
        key = key.strip("/")
        if ".." in key.split("/"):
            raise StorageError(f"key {key!r} escapes the store root {self.root}")
        return self.root / key if key else self.root

    def check(self, write: bool = False) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the local store {self.root}: {e.strerror}; choose a writable path with --storage") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"the local store {self.root} is not writable; choose another path with --storage")

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        path = self._path(key)
        # Hidden temp names are skipped by list(): a reader never sees a partial file.
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in as_parts(data):
                view = part.cast("B") if part.format != "B" or part.ndim != 1 else part
                while view.nbytes:
                    n = os.write(fd, view)
                    view = view[n:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        path = self._path(key)
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
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            _discard(tmp)

    def _replace(self, key: str, path: Path, data: bytes, expect: bytes) -> bool:
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.stat(path).st_ino != os.fstat(fd).st_ino:
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
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                view = memoryview(buf)
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
                return view[:got]
        except FileNotFoundError:
            raise NotFoundError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise NotFoundError(f"{path} is a folder, not a file") from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from e

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(max(0, end - start))
                n = os.preadv(f.fileno(), [buf], start)
                return memoryview(buf)[:n]
        except FileNotFoundError:
            raise NotFoundError(f"{path} does not exist") from None

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        # Straight into the caller's buffer (os.preadv releases the GIL): no intermediate copy.
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise NotFoundError(f"{path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            got = 0
            while got < out.nbytes:
                n = os.preadv(fd, [out[got:]], offset + got)
                if n == 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

    def size(self, key: str) -> int | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if not os.path.isdir(self._path(key)) else None

    def list(self, prefix: str = "") -> list[Entry]:
        base = self._path(prefix)
        out = []
        if base.is_file():
            return [Entry(prefix.strip("/"), base.stat().st_size)]
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.startswith("."):
                    continue
                p = Path(dirpath) / f
                try:
                    out.append(Entry(p.relative_to(self.root).as_posix(), p.stat().st_size))
                except FileNotFoundError:  # removed while listing
                    continue
        return sorted(out, key=lambda e: e.key)

    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[Entry]]:
        base = self._path(prefix)
        dirs, files = [], []
        try:
            with os.scandir(base) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        dirs.append(e.name)
                    else:
                        files.append(Entry(join(prefix, e.name), e.stat().st_size))
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return sorted(dirs), sorted(files, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {path}: {e.strerror or e}") from e
        # Drop folders left empty, up to the root, so deleted runs vanish from listings.
        parent = path.parent
        while parent != self.root and parent.is_dir():
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def clear_partial(self, folder: str, name_prefix: str) -> int:
        # Temp files are `.{name}.{random}.tmp` (see put); a killed writer leaves its own behind.
        base = self._path(folder)
        stale = list(base.glob(f".{name_prefix}*.tmp")) if base.is_dir() else []
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


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _discard(tmp: Path) -> None:
    """Remove a temp file after a failed write; the write's error is the one worth reporting."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # e.g. the filesystem turned read-only: the next run's clear_partial retries it
