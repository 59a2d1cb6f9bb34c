"""Streaming stored activations: RCache yields megabatches `[rows, seq, d]` (tokens.py: batches).

Files are read ahead in background threads, each with parallel ranged reads into one recycled
buffer (pinned when the device is CUDA) and parsed in place: the tensors are views of that buffer
(stream.py). A missing, truncated or corrupted file raises an error naming it; the stream never
ends early in silence. Positions (epoch, file index) are exact, so a restarted reader neither
repeats nor skips data.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import torch

from activault.errors import ConfigError
from activault.reading.stream import (
    FileRef,
    FileStream,
    Megabatch,
    Reader,
    Source,
    check_device,
    mix_seed,
)


class RCache(Reader):
    """Megabatches `[rows, seq, d]` of stored activations, read ahead in the background.

    Args:
        uri: a hook folder (local path or `s3://bucket/run/hook`), a Store, or a list of them
            (concatenated in order; they must agree on d_model, dtype and seq_len). With `hooks`,
            the run folder(s) instead, and each item holds every hook's states for the same tokens.
        return_ids: yield `{"states", "input_ids" (int64), "positions" (int32, -1 = padding)}`.
        buffer_size: files read ahead while the consumer works on the current one.
        shuffle: permute tokens within each megabatch (seeded; ids and positions move along).
        preserve_file_order: False shuffles the file order with the seed (and the epoch).
        rank, world_size: read every world_size-th file from `rank` (DDP; disjoint, covering).
        skip_bad_files: warn about, count (`bad_files`) and skip unreadable files, and files some
            hooks lack, instead of raising.
        store_options: passed to `open_store` (e.g. `{"unsigned": True}` for a public bucket).
        range_size: bytes per ranged read (default: each file split over the 8 range workers, in
            ranges of 4 to 16 MiB; a file of at most 4 MiB in one request); larger than any file:
            one GET each.
        verify_checksums: check every file's bytes against the checksums in its header (a
            FormatError names the file and tensor); costs a hash pass (README: Benchmarks).
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        *,
        hooks: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        return_ids: bool = False,
        buffer_size: int = 2,
        shuffle: bool = False,
        preserve_file_order: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_bad_files: bool = False,
        store_options: dict[str, Any] | None = None,
        range_size: int | None = None,
        verify_checksums: bool = False,
    ):
        self.device = check_device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        files = FileStream(
            uri,
            hooks=hooks,
            buffer_size=buffer_size,
            preserve_file_order=preserve_file_order,
            seed=seed,
            rank=rank,
            world_size=world_size,
            skip_bad_files=skip_bad_files,
            store_options=store_options,
            range_size=range_size,
            pin=self._pin,
            verify_checksums=verify_checksums,
            transform=self._shuffle,
        )
        super().__init__(files)
        self.return_ids = return_ids
        self.shuffle = shuffle
        self.epoch = 0
        self._next = 0

    def __len__(self) -> int:
        """Files this rank reads per epoch."""
        return len(self.files.order(self.epoch))

    def _shuffle(self, f: FileRef, epoch: int, item: Megabatch) -> Megabatch:
        """Tokens permuted within the megabatch (on the reading thread), seeded by file, epoch."""
        if not self.shuffle:
            return item
        rows, seq = item.input_ids.shape
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, f.source, f.name))
        perm = torch.randperm(rows * seq, generator=gen)
        states = []
        for s in item.states:
            flat = s.reshape(rows * seq, -1)
            out = self.files.buffers.empty(tuple(flat.shape), flat.dtype)
            states.append(torch.index_select(flat, 0, perm, out=out).view(rows, seq, -1))
        ids, pos = item.input_ids.reshape(-1)[perm], item.positions.reshape(-1)[perm]
        return Megabatch(states, ids.view(rows, seq), pos.view(rows, seq))

    def _deliver(self, item: Megabatch) -> Any:
        if self.device.type == "cpu":
            states, pos = item.states, item.positions
            ids = item.input_ids.to(torch.int64) if self.return_ids else item.input_ids  # widened only if yielded
        else:  # from pinned buffers, asynchronously; ids widened on the device
            nb = self._pin
            states = [s.to(self.device, non_blocking=nb) for s in item.states]
            ids = item.input_ids.to(self.device, non_blocking=nb).to(torch.int64)
            pos = item.positions.to(self.device, non_blocking=nb)
            if nb:  # the buffers are reused only once these copies are done
                done = torch.cuda.Event()
                done.record()
                self.files.buffers.copied([*item.states, item.input_ids, item.positions], done)
        out: Any = dict(zip(self.hooks, states, strict=True)) if self.hooks else states[0]
        if not self.return_ids:
            return out
        return {"states": out, "input_ids": ids, "positions": pos}

    def _iterate(self) -> Generator[Any, None, None]:
        with self.files.prefetch(self.epoch, self._next) as files:
            for index, item in files:
                self._next = index + 1
                yield self._deliver(item)
                del item  # not held while waiting for the next file
        self.epoch += 1
        self._next = 0

    # -- position --------------------------------------------------------------------------------

    @property
    def current_file_index(self) -> int:
        """Index (in this rank's order) of the next file to yield."""
        return self._next

    def set_file_index(self, index: int) -> None:
        """Start the next iteration at file `index` of this rank's order."""
        n = len(self)
        if not 0 <= index <= n:
            raise ConfigError(f"file index {index} is out of range [0, {n}]")
        self._next = index

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "file_index": self._next,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "rank", "world_size"):
            if state[k] != getattr(self, k):
                raise ConfigError(f"state was saved with {k}={state[k]}, this reader has {k}={getattr(self, k)}")
        self.epoch = int(state["epoch"])
        self.set_file_index(int(state["file_index"]))

    def __enter__(self) -> RCache:
        return self


class S3RCache(RCache):
    """RCache over `run/hook` prefixes of one S3 bucket: the original project's API."""

    def __init__(
        self,
        s3_prefix: str | Sequence[str],
        *,
        bucket_name: str | None = None,
        endpoint: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        unsigned: bool | None = None,
        **options: Any,
    ):
        bucket = bucket_name or os.environ.get("S3_BUCKET_NAME")
        if not bucket:
            raise ConfigError("no bucket: pass bucket_name= or set S3_BUCKET_NAME")
        env = dict(os.environ)
        if endpoint:
            env["S3_ENDPOINT_URL"] = endpoint
        if aws_access_key_id and aws_secret_access_key:
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = (
                aws_access_key_id,
                aws_secret_access_key,
            )
        store_options = {"env": env, **({"unsigned": unsigned} if unsigned is not None else {})}
        store_options.update(options.pop("store_options", None) or {})
        prefixes = [s3_prefix] if isinstance(s3_prefix, str) else list(s3_prefix)
        super().__init__(
            [f"s3://{bucket}/{p.strip('/')}" for p in prefixes],
            store_options=store_options,
            **options,
        )

    @classmethod
    def from_credentials(
        cls, aws_access_key_id: str, aws_secret_access_key: str, *args: Any, **kwargs: Any
    ) -> S3RCache:
        return cls(
            *args,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            **kwargs,
        )
