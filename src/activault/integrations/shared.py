"""What the integrations share: a run's exact statistics and the DDP rank.

Also the one place they import activault's internals from (records, megabatch format, writer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from activault.collection.writer import Writer
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Store, open_store
from activault.vault.megabatch import encode
from activault.vault.records import (
    ProgressRecord,
    cfg_key,
    file_name,
    header_metadata,
    hook_metadata,
    metadata_key,
    progress_key,
    write_record,
)
from activault.vault.runs import merge_statistics
from activault.vault.stats import RunningStats, merge_all

__all__ = [
    "ProgressRecord",
    "RunningStats",
    "Store",
    "Writer",
    "cfg_key",
    "dist_rank",
    "encode",
    "file_name",
    "header_metadata",
    "hook_metadata",
    "merge_statistics",
    "metadata_key",
    "open_store",
    "progress_key",
    "read_json",
    "run_statistics",
    "write_json",
    "write_record",
]

Source = str | Path | Store


def _sources(uri: Source | Sequence[Source]) -> list[Source]:
    return [uri] if isinstance(uri, str | Path | Store) else list(uri)


def run_statistics(uri: Source | Sequence[Source], hook: str) -> RunningStats:
    """A hook's exact statistics over one run, or merged over several (as `TokenLoader` reads them)."""
    parts = []
    for src in _sources(uri):
        store = src if isinstance(src, Store) else open_store(src)
        key = f"{hook}/statistics.json"
        try:
            parts.append(RunningStats.from_dict(json.loads(store.get_text(key))))
        except NotFoundError:
            raise NotFoundError(
                f"{store.url(key)} does not exist: the run has no hook {hook!r}, or its collection has not "
                "finished (`activault merge-stats RUN_URI` rebuilds it from finished machines)"
            ) from None
        except (ValueError, KeyError) as e:
            raise FormatError(
                f"{store.url(key)} is unreadable ({e}); rebuild it with `activault merge-stats RUN_URI`"
            ) from None
    stats = merge_all(parts)
    if stats is None or stats.count == 0:
        raise ConfigError(f"the statistics of {hook!r} count no tokens: the run holds no data for it")
    return stats


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """A JSON object as stored, or None if absent (records compared as written, not as typed)."""
    try:
        obj = json.loads(store.get_text(key))
    except NotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{store.url(key)} is not valid JSON ({e}); delete the run and import again") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{store.url(key)} is not a JSON object; delete the run and import again")
    return obj


def write_json(store: Store, key: str, obj: Any) -> None:
    """As `write_record` writes records: sorted keys, so equal contents are equal bytes."""
    store.put_text(key, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def dist_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): as given, else torch.distributed's when it is initialised, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (
            dist.get_world_size() if world_size is None else world_size
        )
    return rank or 0, world_size or 1
