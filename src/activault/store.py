"""One storage interface: the local filesystem (the default) and S3-compatible object storage.

"Local or S3" is just a URI: a plain path or `file://...` is a `LocalStore`, `s3://bucket/prefix`
is an `S3Store`. Keys are `/`-separated and relative to the store's root. `put` is atomic in both:
a reader sees the whole object or none of it (local: temp name + rename; S3: a PUT or a completed
multipart upload).
"""

from __future__ import annotations

import builtins
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, NotFoundError, StorageError

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Entry:
    key: str
    size: int


def _as_parts(data: Buffer | Sequence[Buffer]) -> list[memoryview]:
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
    def check(self, write: bool = False) -> None:
        """Fail now, with a clear message, if the store cannot be reached (or, with `write`, written)."""

    def cost_notes(self, nbytes: int) -> builtins.list[str]:
        """Warnings about moving `nbytes` to this store (remote endpoints, egress); none for local."""
        return []

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


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


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
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for part in _as_parts(data):
                    view = part.cast("B") if part.format != "B" or part.ndim != 1 else part
                    while view.nbytes:
                        n = os.write(fd, view)
                        view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(
                f"cannot write {path}: {e.strerror or e}; free space or fix permissions (or choose another "
                "--storage), then run the same command again to resume"
            ) from e

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
                        files.append(Entry(_join(prefix, e.name), e.stat().st_size))
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return sorted(dirs), sorted(files, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
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
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def s3_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    """S3 connection settings from the environment (the original's names and the standard AWS_* ones)."""
    env = dict(os.environ if env is None else env)
    out = {}
    endpoint = env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["endpoint"] = endpoint
    for key, names in {
        "access_key_id": ("AWS_ACCESS_KEY_ID",),
        "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
        "session_token": ("AWS_SESSION_TOKEN",),
        "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    }.items():
        for n in names:
            if env.get(n):
                out[key] = env[n]
                break
    return out


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"storage URI {uri!r} names no bucket; write s3://BUCKET[/PREFIX]")
    return bucket, prefix.strip("/")


def open_store(uri: str | Path, **options: Any) -> Store:
    """The store for a URI: a path or file:// (local) or s3://bucket/prefix (object storage)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        from .s3 import S3Store

        return S3Store(uri, **options)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(f"unsupported storage scheme {scheme!r} in {uri!r}; use a local path, file://PATH or s3://BUCKET/PREFIX")
    return LocalStore(uri, **{k: v for k, v in options.items() if k == "fsync"})
