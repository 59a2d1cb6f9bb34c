"""Storage: one interface (base), two backends (local, s3), one URI parser (uri)."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from activault.errors import ConfigError
from activault.storage.base import Buffer, Entry, Store
from activault.storage.local import LocalStore
from activault.storage.uri import StoreURI, parse_uri

__all__ = [
    "STORE_OPTIONS",
    "Buffer",
    "Entry",
    "LocalStore",
    "Store",
    "StoreURI",
    "check_store_options",
    "locate",
    "open_store",
    "open_stores",
    "parse_uri",
]

# The options `open_store` takes, per scheme: the stores' keyword arguments. S3Store's are named
# here (storage.s3 imports obstore, only once S3 is used); tests/storage checks both lists against
# the signatures.
STORE_OPTIONS: dict[str, tuple[str, ...]] = {
    "file": ("fsync", "map_reads"),
    "s3": (
        "env",
        "unsigned",
        "max_retries",
        "retry_timeout",
        "timeout",
        "part_size",
        "multipart_threshold",
        "part_concurrency",
    ),
}
_NAMES = {"file": "the local store", "s3": "the S3 store"}


def check_store_options(options: Mapping[str, Any], schemes: Collection[str] = tuple(STORE_OPTIONS)) -> None:
    """A ConfigError naming the options that no store of these schemes takes, and what they take."""
    bad = [k for k in options if not any(k in STORE_OPTIONS[s] for s in schemes)]
    if not bad:
        return
    if not schemes:
        raise ConfigError(
            f"store options {', '.join(map(repr, bad))} apply to the stores a reader opens from URIs, and every "
            "source here is a Store already: pass them to its constructor instead"
        )
    takes = "; ".join(f"{_NAMES[s]} takes {', '.join(STORE_OPTIONS[s])}" for s in schemes)
    other = [k for k in bad if any(k in names for names in STORE_OPTIONS.values())]
    note = f" ({', '.join(other)}: for another kind of store)" if other else ""
    raise ConfigError(f"unknown store option(s) {', '.join(map(repr, bad))}{note}: {takes}")


def open_store(uri: str | Path, **options: Any) -> Store:
    """The store rooted at a URI: a path or file:// (local) or s3://bucket/prefix (object storage).

    `options`: the store's own (STORE_OPTIONS); any other name is a ConfigError listing them.
    """
    parsed = parse_uri(uri)
    check_store_options(options, [parsed.scheme])
    if parsed.scheme == "s3":
        from activault.storage.s3 import S3Store  # obstore only when S3 is used

        return S3Store(str(parsed), **options)
    return LocalStore(parsed.path, **options)


def open_stores(sources: Sequence[str | Path | Store], options: Mapping[str, Any]) -> list[Store]:
    """A store per source (a Store is kept as it is), sharing `options`: each store opened from a URI
    takes those of its kind, and a name that none of them takes is a ConfigError."""
    schemes = {parse_uri(s).scheme: None for s in sources if not isinstance(s, Store)}
    check_store_options(options, list(schemes))
    out: list[Store] = []
    for s in sources:
        if not isinstance(s, Store):
            scheme = parse_uri(s).scheme
            s = open_store(s, **{k: v for k, v in options.items() if k in STORE_OPTIONS[scheme]})
        out.append(s)
    return out


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
