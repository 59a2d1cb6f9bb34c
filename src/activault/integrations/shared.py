"""What the integrations share: a run's exact statistics, the DDP rank and the loaders' options.

Also the one place they import activault's internals from (records, the run writer).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from activault.errors import ConfigError, NotFoundError
from activault.reading.options import ReadOptions, keywords, read_options, whole
from activault.reading.rcache import check_state
from activault.reading.stream import Source
from activault.storage import Store, open_store
from activault.vault.records import (
    HookMetadata,
    ImportSource,
    ProgressRecord,
    RunRecord,
    hook_metadata,
    progress_key,
    read_progress,
    read_run,
    read_statistics,
    statistics_key,
)
from activault.vault.stats import RunningStats, check_normalisable, merge_all
from activault.vault.writer import RunWriter

__all__ = [
    "HookMetadata",
    "ImportSource",
    "ProgressRecord",
    "ReadOptions",
    "RunRecord",
    "RunWriter",
    "RunningStats",
    "Store",
    "check_state",
    "dist_rank",
    "hook_metadata",
    "loader_options",
    "open_store",
    "progress_key",
    "read_progress",
    "read_run",
    "run_statistics",
    "whole",
]


def _sources(uri: Source | Sequence[Source]) -> list[Source]:
    return [uri] if isinstance(uri, str | Path | Store) else list(uri)


def run_statistics(uri: Source | Sequence[Source], hook: str, normalise: bool = False) -> RunningStats:
    """A hook's exact statistics over one run, or merged over several (as `TokenLoader` reads them).

    A damaged statistics.json is a FormatError naming the file, the field and the repair.
    `normalise`: the statistics will scale activations, so statistics that are not finite (they
    counted tokens with NaN or Inf in) are a DataError naming the run, the hook and the fix.
    """
    parts = []
    for src in _sources(uri):
        store = src if isinstance(src, Store) else open_store(src)
        record = read_statistics(store, hook)
        if record is None:
            raise NotFoundError(
                f"{store.url(statistics_key(hook))} does not exist: the run has no hook {hook!r}, or its "
                "collection has not finished (`activault merge-stats RUN_URI` rebuilds it from finished machines)"
            )
        stats = record.running()
        parts.append(check_normalisable(stats, store.url(hook)) if normalise else stats)
    total = merge_all(parts)
    if total is None or total.count + total.nonfinite_tokens == 0:
        raise ConfigError(f"the statistics of {hook!r} count no tokens: the run holds no data for it")
    return total


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


def loader_options(
    owner: Callable[..., Any],
    fixed: Collection[str],
    options: ReadOptions | None,
    kwargs: Mapping[str, Any],
    rank: int | None,
    world_size: int | None,
) -> tuple[ReadOptions, dict[str, Any]]:
    """(ReadOptions, TokenLoader keywords) of an integration's loader, checked once, here.

    `owner`: the integration's constructor (its name and keywords go into the error for an unknown
    option); `fixed`: the TokenLoader arguments it sets itself. Rank and world_size are its own
    arguments, else `options`' (when not 0 and 1), else torch.distributed's.
    """
    from activault.reading.tokens import TokenLoader

    own = [*keywords(owner, "uri", "options"), *keywords(TokenLoader.__init__, "uri", "options", *fixed)]
    read, rest = read_options(owner.__qualname__.split(".")[0], options, kwargs, own)
    if rank is None and world_size is None and (read.rank, read.world_size) != (0, 1):
        rank, world_size = read.rank, read.world_size
    rank, world_size = dist_rank(rank, world_size)
    return replace(read, rank=rank, world_size=world_size), rest
