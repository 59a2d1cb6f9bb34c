"""Storage: one interface (base), two backends (local, s3), one URI parser (uri)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from activault.storage.base import Buffer, Entry, Store
from activault.storage.local import LocalStore
from activault.storage.uri import StoreURI, parse_uri

__all__ = ["Buffer", "Entry", "LocalStore", "Store", "StoreURI", "locate", "open_store", "parse_uri"]


def open_store(uri: str | Path, **options: Any) -> Store:
    """The store rooted at a URI: a path or file:// (local) or s3://bucket/prefix (object storage)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        from activault.storage.s3 import S3Store  # obstore only when S3 is used

        return S3Store(str(parsed), **options)
    return LocalStore(parsed.path, **{k: v for k, v in options.items() if k in ("fsync", "map_reads")})


def locate(uri: str | Path) -> tuple[Store, str]:
    """(store, key) for a URI naming an object or folder inside a store.

    S3: the bucket and the rest. Local: the store is the folder holding the nearest run at or above
    the path (a folder with cfg.json or progress/), else the path itself (its folder, for a file),
    so the store's guard keeps every read below it (links under the root are never followed).
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return open_store(f"s3://{parsed.bucket}"), parsed.path
    path = Path(os.path.normpath(parsed.path))
    root = next((p.parent for p in (path, *path.parents) if _is_run(p)), None)
    if root is None:
        root = path if path.is_dir() or not path.exists() else path.parent
    key = path.relative_to(root).as_posix()
    return LocalStore(root), "" if key == "." else key


def _is_run(folder: Path) -> bool:
    return folder != folder.parent and ((folder / "cfg.json").is_file() or (folder / "progress").is_dir())
