"""Streaming stored activations: RCache yields megabatches `[rows, seq, d]` (tokens.py: batches).

Files are read ahead in background threads, each with parallel ranged reads into one recycled
buffer (pinned when the device is CUDA) and parsed in place: the tensors are views of that buffer
(stream.py). A missing, truncated or corrupted file raises an error naming it; the stream never
ends early in silence. Positions (epoch, file index) are exact, so a restarted reader neither
repeats nor skips data.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Generator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from activault.errors import ConfigError
from activault.reading.device import check_device, to_device
from activault.reading.filters import FILTERS, FilteredFile, TokenMask, norm_limits
from activault.reading.options import ReadArgs, ReadOptions, flag, invalid, keywords, read_options
from activault.reading.order import mix_seed
from activault.reading.stream import FileRef, FileStream, LoadedFile, Reader, Source

if TYPE_CHECKING:
    from typing_extensions import Unpack


def check_whole(options: ReadOptions) -> None:
    """Refuse `drop_nonfinite` for megabatches: they are yielded whole, so nothing is dropped."""
    if options.drop_nonfinite:
        raise invalid(
            "drop_nonfinite",
            True,
            "False for megabatches (RCache yields them whole: mask tokens with "
            "torch.isfinite(states).all(-1)); TokenLoader, or batch_tokens=, drops them from token batches",
        )


def check_state(state: Any, owner: str, bounds: Mapping[str, tuple[int, int | None]]) -> dict[str, Any]:
    """`state` (a saved `state_dict()`), once each field in `bounds` is a whole number in [lo, hi]
    (hi None: no upper bound); else one ConfigError naming the field. Numpy integers pass (a state
    kept in an array); bools, floats and strings do not."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"not a {owner} state_dict: a {type(state).__name__}, not a mapping of fields")
    missing = [k for k in bounds if k not in state]
    if missing:
        raise ConfigError(f"not a {owner} state_dict: no {', '.join(missing)}")
    for key, (lo, hi) in bounds.items():
        v = state[key]
        if (
            isinstance(v, bool)
            or not isinstance(v, numbers.Integral)
            or not lo <= int(v) <= (hi if hi is not None else int(v))
        ):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{owner} state: field {key!r} is {v!r}, not a whole number {span}")
    return dict(state)


class RCache(Reader):
    """Megabatches `[rows, seq, d]` of stored activations, read ahead in the background.

    Args:
        uri: a hook folder (local path or `s3://bucket/run/hook`), a Store, or a list of them
            (concatenated in order; they must agree on d_model, dtype and seq_len). With `hooks`,
            the run folder(s) instead, and each item holds every hook's states for the same tokens.
        return_ids: yield `{"states", "input_ids" (int64), "positions" (int32, -1 = padding),
            "documents"}`: int64, each token's document ordinal in its machine's stream (-1 =
            padding; None for files written before provenance, format version 3 and older).
            With a `token_filter` or a `split` the item is such a dict with `"keep"` too: `[rows,
            seq]` bool, False for padding, the tokens the filter drops and those of the split's
            other side (megabatches stay whole, so they are masked, not dropped; `filtered`
            counts each filter's drops, as TokenLoader's).
        shuffle: permute tokens within each megabatch (seeded; ids and positions move along).
        options, **read: how the files are read (ReadOptions, whose fields are documented there):
            `buffer_size`, `preserve_file_order` (default True here), `seed`, `rank`,
            `world_size`, `skip_bad_files`, `store_options` (e.g. `{"unsigned": True}` for a
            public bucket), `range_size`, `verify_checksums`, `token_filter`, `split` (with
            `test_fraction`, `split_seed`; `drop_nonfinite` is refused: megabatches are whole); as keywords, or in
            `options=ReadOptions(...)` (keywords override its fields). A name that is none of
            these is a ConfigError listing them.
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        *,
        hooks: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        return_ids: bool = False,
        shuffle: bool = False,
        options: ReadOptions | None = None,
        **read: Unpack[ReadArgs],
    ):
        opts, _ = read_options(type(self).__name__, options, read, own=keywords(RCache.__init__, "uri", "options"))
        check_whole(opts)
        return_ids, shuffle = flag("return_ids", return_ids), flag("shuffle", shuffle)
        self.device = check_device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        files = FileStream(uri, opts.ordered(True), hooks=hooks, pin=self._pin, transform=self._load)
        super().__init__(files)
        spec, self.split = opts.tokens, opts.held_out
        self._mask = None
        if spec.active or self.split is not None:
            limits = norm_limits(files.catalog.prefixes, spec, len(self.hooks or [""]))
            self._mask = TokenMask(spec, limits, self.split)
        self.filtered = dict.fromkeys(FILTERS, 0)  # tokens each filter masked out so far (token_filter)
        self.return_ids = return_ids or self._mask is not None
        self.shuffle = shuffle
        self.epoch = 0
        self._next = 0

    def __len__(self) -> int:
        """Files this rank reads per epoch."""
        return len(self.files.order(self.epoch))

    def _shuffle(self, f: FileRef, epoch: int, item: LoadedFile) -> LoadedFile:
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
        docs = None if item.documents is None else item.documents.reshape(-1)[perm].view(rows, seq)
        return replace(
            item, states=states, input_ids=ids.view(rows, seq), positions=pos.view(rows, seq), documents=docs
        )

    def _load(self, f: FileRef, epoch: int, item: LoadedFile) -> LoadedFile:
        """On the reading thread: tokens shuffled, then (with a filter) the kept ones found."""
        item = self._shuffle(f, epoch, item)
        if self._mask is None:
            return item
        return self._mask.apply(item, self.files.catalog.prefixes[f.source].url(0, f.name))

    def _deliver(self, item: LoadedFile) -> Any:
        # On the device (from pinned buffers, asynchronously); ids and positions only if yielded.
        docs = item.documents if self.return_ids else None
        extra = [item.input_ids, item.positions, *([docs] if docs is not None else [])] if self.return_ids else []
        if isinstance(item, FilteredFile):
            keep = torch.zeros(item.positions.shape, dtype=torch.bool)
            keep.view(-1)[torch.from_numpy(item.kept) if item.kept is not None else slice(None)] = True
            extra.append(keep)
            for name, n in item.dropped.items():
                self.filtered[name] += n
        moved = to_device([*item.states, *extra], self.device, self.files.buffers)
        states = moved[: len(item.states)]
        out: Any = dict(zip(self.hooks, states, strict=True)) if self.hooks else states[0]
        if not self.return_ids:
            return out
        ids, pos, *more = moved[len(item.states) :]
        got = {"states": out, "input_ids": ids.to(torch.int64), "positions": pos}  # ids widened on the device
        got["documents"] = more.pop(0) if docs is not None else None
        return {**got, "keep": more[0]} if more else got

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
        """Resume where `state` (from `state_dict()` of a reader with the same seed, rank and
        world_size) was saved; a field out of its bounds is a ConfigError naming it."""
        bounds = {"epoch": (0, None), "file_index": (0, len(self)), "seed": (-(2**63), None)}
        state = check_state(state, "RCache", {**bounds, "rank": (0, None), "world_size": (1, None)})
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
        **kwargs: Any,
    ):
        """Args: as RCache's (`options=ReadOptions(...)` or its fields as keywords, `hooks`, ...);
        `endpoint`, the credentials and `unsigned` go into `store_options`."""
        own = [*keywords(S3RCache.__init__, "s3_prefix"), *keywords(RCache.__init__, "uri", "options")]
        opts, rest = read_options("S3RCache", kwargs.pop("options", None), kwargs, own)
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
        store = {"env": env, **({"unsigned": unsigned} if unsigned is not None else {}), **(opts.store_options or {})}
        prefixes = [s3_prefix] if isinstance(s3_prefix, str) else list(s3_prefix)
        uris: list[Source] = [f"s3://{bucket}/{p.strip('/')}" for p in prefixes]
        super().__init__(uris, options=replace(opts, store_options=store), **rest)

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
