"""Storage: one interface (base), two backends (local, s3), one URI parser (uri)."""

from __future__ import annotations

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
    return LocalStore(parsed.path, **{k: v for k, v in options.items() if k == "fsync"})


def locate(uri: str | Path) -> tuple[Store, str]:
    """(store, key) for a URI naming an object or folder: the bucket (S3) or `/` (local) and the rest."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return open_store(f"s3://{parsed.bucket}"), parsed.path
    return LocalStore("/"), parsed.path.lstrip("/")
