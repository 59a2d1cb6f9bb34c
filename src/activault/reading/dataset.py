"""ActivationDataset: RCache or TokenLoader as a torch IterableDataset, one shard per DataLoader worker."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from activault.errors import ConfigError
from activault.reading.options import ReadOptions, keywords, read_options, whole
from activault.reading.rcache import RCache, check_whole
from activault.reading.stream import Source
from activault.reading.tokens import TokenLoader
from activault.storage import Store
from activault.storage.uri import is_s3


class ActivationDataset(IterableDataset):
    """RCache megabatches, or TokenLoader batches with `batch_tokens`, for a DataLoader.

    Each DataLoader worker reads its own files: shard `rank * num_workers + worker` of
    `world_size * num_workers`. Call `set_epoch` before each epoch for a new file order.
    With S3, a process that already used S3 must start workers with
    `DataLoader(..., multiprocessing_context="spawn")`: obstore's I/O runtime does not survive fork.
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        *,
        batch_tokens: int | None = None,
        options: ReadOptions | None = None,
        **kwargs: Any,
    ):
        """Args: `batch_tokens` (None: megabatches); `rank`, `world_size` and the other reading
        options (ReadOptions, or keywords) and the reader's own keywords, as RCache's or
        TokenLoader's. They are checked here, not first in a DataLoader worker."""
        reader = RCache if batch_tokens is None else TokenLoader
        own = keywords(reader.__init__, "uri", "options", "batch_tokens")
        self.options, self.reader_options = read_options("ActivationDataset", options, kwargs, own)
        if batch_tokens is None:
            check_whole(self.options)
        self.uri = uri
        self.batch_tokens = None if batch_tokens is None else whole("batch_tokens", batch_tokens)
        self.rank, self.world_size = self.options.rank, self.options.world_size
        self.epoch = 0
        self._pickled = False  # False in a forked worker: it shares the parent's memory

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _pickled=True)

    def _check_fork(self) -> None:
        uris = [self.uri] if isinstance(self.uri, str | Path | Store) else list(self.uri)
        s3 = any(is_s3(u) or type(u).__module__ == "activault.storage.s3" for u in uris)
        if s3 and not self._pickled and "activault.storage.s3" in sys.modules:
            raise ConfigError(
                "DataLoader workers were forked from a process that already used S3, and "
                "obstore's I/O runtime does not survive fork (reads would hang): pass "
                "multiprocessing_context='spawn' to DataLoader"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        n, i = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None:
            self._check_fork()
        opts = replace(self.options, rank=self.rank * n + i, world_size=self.world_size * n)
        reader: RCache | TokenLoader
        if self.batch_tokens is None:
            reader = RCache(self.uri, options=opts, **self.reader_options)
        else:
            reader = TokenLoader(self.uri, batch_tokens=self.batch_tokens, options=opts, **self.reader_options)
        reader.epoch = self.epoch
        with reader:
            yield from reader
