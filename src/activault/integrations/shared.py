"""What the integrations share: a run's exact statistics, endless epochs, the DDP rank.

Also the one place they import activault's internals from (records, megabatch format, writer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activault.collection.writer import Writer
from activault.errors import ConfigError, FormatError, NotFoundError
from activault.storage import Store, open_store
from activault.vault.megabatch import dtype_name, encode, file_name, hook_metadata
from activault.vault.records import merge_statistics, progress_key, read_json, write_json
from activault.vault.stats import RunningStats, merge_all

if TYPE_CHECKING:
    from activault import TokenLoader

__all__ = [
    "RunningStats", "Store", "Writer", "dtype_name", "encode", "endless", "file_name", "hook_metadata",
    "merge_statistics", "open_store", "progress_key", "read_json", "run_statistics", "write_json",
    "dist_rank",
]  # fmt: skip

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
        raise ConfigError(
            f"the statistics of {hook!r} count no tokens: the run holds no data for it"
        )
    return stats


def endless(loader: TokenLoader) -> Iterator[Any]:
    """The loader's epochs one after another, without end.

    Each epoch is reshuffled: the loader seeds its file order and its window permutations with
    (seed, epoch) and counts epochs itself, so `loader.state_dict()` stays exact across epochs.
    Stand-in for `TokenLoader(..., loop=True)`: once the loader has it, this is `iter(loader)`.
    """
    while True:
        state = loader.state_dict()
        fresh = state["window"] == 0 and state["offset"] == 0
        batches = iter(loader)
        got = False
        try:
            for batch in batches:
                got = True
                yield batch
        finally:
            batches.close()  # type: ignore[attr-defined]  # stops the reader's threads now, also when abandoned
        if fresh and not got:
            raise ConfigError(
                f"an epoch of this loader yields no batch of {loader.batch_tokens} tokens (rank "
                f"{loader.cache.rank} of {loader.cache.world_size}): use a smaller batch_tokens or "
                "world_size, or a run with more tokens"
            )


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
