"""Streaming stored activations: RCache yields megabatches `[rows, seq, d]` (token batches: loader.py).

Files are read ahead in a thread pool, each with parallel ranged reads into one preallocated
buffer (pinned when the device is CUDA) and parsed in place: the tensors are views of that buffer.
A missing, truncated or corrupted file raises an error naming it; the stream never ends early in
silence. Positions (file index, window, offset) are exact, so a restarted reader neither repeats
nor skips data.
"""

from __future__ import annotations

import functools
import json
import os
import random
import threading
import warnings
import weakref
import zlib
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from activault.errors import ConfigError, FormatError, NotFoundError, StorageError
from activault.storage import Entry, Store, open_store
from activault.vault import megabatch as fmt

# 16 MiB ranges: one connection to AWS moves ~90 MB/s, so 8 in flight fill a 5 Gbit/s NIC.
RANGE_SIZE = 16 << 20
RANGE_WORKERS = 8

Source = str | Path | Store
Spec = tuple[int, int, torch.dtype]  # (seq_len, d_model, dtype) of `states`


@dataclass(frozen=True)
class _File:
    source: int
    name: str
    sizes: tuple[int, ...]  # bytes, one per hook


@dataclass(frozen=True)
class _Source:
    store: Store
    folders: tuple[str, ...]  # one per hook, relative to the store root ("" when the URI is a hook folder)

    def key(self, h: int, name: str) -> str:
        return f"{self.folders[h]}/{name}" if self.folders[h] else name


@dataclass
class _Item:
    states: list[torch.Tensor]  # per hook: [rows, seq, d]
    input_ids: torch.Tensor  # [rows, seq] (int32 as stored)
    positions: torch.Tensor  # [rows, seq] int32, -1 = padding


class _Stopped(Exception):
    """Background work cancelled because the reader was closed."""


def check_device(device: str | torch.device) -> torch.device:
    """The device to deliver tensors on; a CUDA device on a machine without one is refused now."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but this machine has no usable CUDA device; use device='cpu'")
    return dev


def _mix(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (Python's hash() of a str is salted per process)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) | (zlib.adler32(repr(parts).encode()) << 32)


def _read_range(store: Store, key: str, start: int, out: memoryview, url: str, stop: threading.Event) -> None:
    """Fill `out` with bytes [start, start + len(out)) of an object; a short read means a truncated file."""
    if stop.is_set():
        raise _Stopped
    want = out.nbytes
    try:
        got = store.read_into(key, start, out)
    except NotFoundError:
        raise NotFoundError(f"{url} does not exist (it was listed: deleted since?)") from None
    if got < want:
        raise FormatError(f"{url}: truncated file (ends at byte {start + got}, listed with more); delete it and collect again")


def _fetch(
    store: Store, key: str, size: int, url: str, stop: threading.Event, pool: ThreadPoolExecutor, pin: bool, range_size: int | None = None
) -> memoryview:
    """The whole object in one preallocated buffer, its ranges (default 16 MiB) read in parallel."""
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    view = buf.numpy().data.cast("B")
    step = range_size or RANGE_SIZE
    starts = range(0, size, step)
    if len(starts) <= 1:
        _read_range(store, key, 0, view, url, stop)
        return view
    futures = [pool.submit(_read_range, store, key, s, view[s : s + step], url, stop) for s in starts]
    try:
        for f in futures:
            f.result()
    finally:
        for f in futures:
            f.cancel()
    return view


def _gather(x: torch.Tensor, index: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """Rows `index` of `x: [n, ...]`, into pinned memory when asked."""
    out = torch.empty((index.numel(), *x.shape[1:]), dtype=x.dtype, pin_memory=pin)
    return torch.index_select(x, 0, index, out=out)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown dtype {name!r} in metadata.json")
    return dt


class RCache:
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
        skip_bad_files: warn about, count (`bad_files`) and skip unreadable files instead of raising.
        store_options: passed to `open_store` (e.g. `{"unsigned": True}` for a public bucket).
        range_size: bytes per ranged read (default RANGE_SIZE, 16 MiB); larger than any file = one GET each.
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
        range_size: int = RANGE_SIZE,
    ):
        uris = [uri] if isinstance(uri, str | Path | Store) else list(uri)
        if not uris:
            raise ConfigError("RCache needs at least one URI")
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.hooks = [h.strip("/") for h in hooks] if hooks else None
        folders = tuple(self.hooks) if self.hooks else ("",)
        self._sources = [
            _Source(u if isinstance(u, Store) else open_store(u, **(store_options or {})), folders) for u in uris
        ]
        self.device = check_device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.return_ids = return_ids
        self.buffer_size = buffer_size
        self.range_size = max(range_size, 1)
        self.shuffle = shuffle
        self.preserve_file_order = preserve_file_order
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.skip_bad_files = skip_bad_files
        self.bad_files = 0
        self.epoch = 0
        self._next = 0
        self._blocks: list[list[_File]] = []  # one block per listing: sync() appends, never reorders
        self._seen: set[tuple[int, str]] = set()
        self._order_cache: tuple[tuple[int, int], list[_File]] | None = None
        self._active: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()
        self._spec_lock = threading.Lock()
        if not self.sync():
            where = ", ".join(s.store.url(s.folders[0]) for s in self._sources)
            raise NotFoundError(f"no megabatch files under {where}; the URI should name a hook folder (run/hook), or pass hooks=")
        self.specs = self._check_compatible()

    # -- listing ---------------------------------------------------------------------------------

    def sync(self) -> int:
        """Pick up files written since the last listing (appended after the known ones); returns how many."""
        new: list[_File] = []
        for si, src in enumerate(self._sources):
            per_hook = []
            for folder in src.folders:
                entries: Sequence[Entry] = src.store.list_dir(folder)[1]  # type: ignore[assignment]
                per_hook.append(fmt.megabatch_files(entries))
            complete = set.intersection(*(set(p) for p in per_hook))
            partial = set.union(*(set(p) for p in per_hook)) - complete
            if partial:
                warnings.warn(
                    f"{len(partial)} file(s) under {src.store.uri} are not yet in every hook (e.g. {min(partial)}); "
                    "sync() picks them up once written",
                    stacklevel=2,
                )
            for name in sorted(complete):
                if (si, name) not in self._seen:
                    self._seen.add((si, name))
                    new.append(_File(si, name, tuple(p[name] for p in per_hook)))
        if new:
            self._blocks.append(new)
        return len(new)

    def _source_spec(self, si: int, h: int) -> Spec | None:
        src = self._sources[si]
        try:
            meta = json.loads(src.store.get_text(src.key(h, "metadata.json")))
            return int(meta["seq_length"]), int(meta["d_model"]), _dtype(meta["dtype"])
        except NotFoundError:
            pass
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise FormatError(f"{src.store.url(src.key(h, 'metadata.json'))}: unreadable ({e})") from None
        first = next((f for b in self._blocks for f in b if f.source == si and f.name.endswith(fmt.SUFFIX)), None)
        if first is None:
            return None  # legacy .pt only: the first decoded file sets the spec
        key, url = src.key(h, first.name), src.store.url(src.key(h, first.name))
        header, _ = fmt.fetch_header(src.store, key)
        try:
            dtype, shape = fmt.logical_specs(header, url)["states"]
            seq, d = shape[1:]
            return int(seq), int(d), dtype
        except (KeyError, ValueError, TypeError):
            raise FormatError(f"{url}: no 'states' tensor of shape [rows, seq, d] in the header") from None

    def _check_compatible(self) -> list[Spec | None]:
        specs: list[Spec | None] = []
        for h in range(len(self._sources[0].folders)):
            found = [(src.store.url(src.folders[h]), self._source_spec(si, h)) for si, src in enumerate(self._sources)]
            known = [(u, s) for u, s in found if s is not None]
            if len({s for _, s in known}) > 1:
                lines = "; ".join(f"{u}: seq_len={s[0]}, d_model={s[1]}, dtype={fmt.dtype_name(s[2])}" for u, s in known)
                raise ConfigError(f"cannot read these prefixes together, their activations differ: {lines}")
            specs.append(known[0][1] if known else None)
        return specs

    def _order(self) -> list[_File]:
        """This shard's files in reading order for the current epoch."""
        key = (self.epoch, len(self._blocks))
        if self._order_cache is None or self._order_cache[0] != key:
            out: list[_File] = []
            for b, block in enumerate(self._blocks):
                block = list(block)
                if not self.preserve_file_order:
                    random.Random(_mix(self.seed, self.epoch, b)).shuffle(block)
                out += block
            self._order_cache = (key, out[self.rank :: self.world_size])
        return self._order_cache[1]

    def __len__(self) -> int:
        """Files this rank reads per epoch."""
        return len(self._order())

    # -- loading ---------------------------------------------------------------------------------

    def _validate(self, tensors: dict[str, torch.Tensor], url: str, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states = tensors.get("states")
        if states is None or states.dim() != 3:
            raise FormatError(f"{url}: no 'states' tensor of shape [rows, seq, d]")
        spec = (states.shape[1], states.shape[2], states.dtype)
        with self._spec_lock:
            expected = self.specs[h] = self.specs[h] or spec
        if spec != expected:
            raise FormatError(
                f"{url}: states are [rows, {spec[0]}, {spec[1]}] {fmt.dtype_name(spec[2])}, the other files "
                f"[rows, {expected[0]}, {expected[1]}] {fmt.dtype_name(expected[2])}: it does not belong here"
            )
        ids = tensors.get("input_ids")
        if ids is None or ids.shape != states.shape[:2]:
            raise FormatError(f"{url}: no 'input_ids' tensor of shape {list(states.shape[:2])}")
        pos = tensors.get("positions")
        if pos is None:  # legacy files: position within the row
            pos = torch.arange(spec[0], dtype=torch.int32).expand(states.shape[0], -1)
        elif pos.shape != states.shape[:2]:
            raise FormatError(f"{url}: 'positions' has shape {list(pos.shape)}, expected {list(states.shape[:2])}")
        return states, ids, pos

    def _load(self, f: _File, stop: threading.Event, ranges: ThreadPoolExecutor) -> _Item:
        src = self._sources[f.source]
        states: list[torch.Tensor] = []
        ids = pos = None
        first_url = ""
        for h, size in enumerate(f.sizes):
            key = src.key(h, f.name)
            url = src.store.url(key)
            buf = _fetch(src.store, key, size, url, stop, ranges, self._pin, self.range_size)
            # Compressed states decode into new memory: pinned too, for the copy to the GPU.
            tensors, _ = fmt.decode(buf, url, functools.partial(torch.empty, pin_memory=self._pin))
            s, i, p = self._validate(tensors, url, h)
            if ids is None:
                ids, pos, first_url = i, p, url
            elif not torch.equal(ids, i):
                raise FormatError(f"{url}: input_ids differ from {first_url}: these hooks do not hold the same tokens")
            states.append(s)
        assert ids is not None and pos is not None
        if self.shuffle:
            rows, seq = ids.shape
            gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, f.source, f.name))
            perm = torch.randperm(rows * seq, generator=gen)
            states = [_gather(s.reshape(rows * seq, -1), perm, self._pin).view(rows, seq, -1) for s in states]
            ids, pos = ids.reshape(-1)[perm].view(rows, seq), pos.reshape(-1)[perm].view(rows, seq)
        return _Item(states, ids, pos)

    def _stream(self, start: int, eager: bool = False) -> Generator[tuple[int, _Item], None, None]:
        """(index in this shard's order, item) from file `start` on, `buffer_size` files read ahead.

        Args:
            eager: start the next reads before yielding, so `buffer_size` files are in flight while
                the consumer works (TokenLoader holds a whole window); else one of them starts on
                the next request, and a consumer holds buffer_size files at most (RCache).
        """
        stop = threading.Event()
        files = ThreadPoolExecutor(self.buffer_size, thread_name_prefix="activault-read")
        ranges = ThreadPoolExecutor(RANGE_WORKERS, thread_name_prefix="activault-range")
        pending: deque[tuple[int, Future[_Item]]] = deque()
        i = start

        def refill() -> None:
            nonlocal i
            order = self._order()  # re-read: sync() may have appended files
            while len(pending) < self.buffer_size and i < len(order):
                pending.append((i, files.submit(self._load, order[i], stop, ranges)))
                i += 1

        try:
            while True:
                refill()
                if not pending:
                    return
                index, future = pending.popleft()
                try:
                    item = future.result()
                except (FormatError, StorageError) as e:
                    if not self.skip_bad_files:
                        raise
                    self.bad_files += 1
                    warnings.warn(f"skipping a bad file: {e}", stacklevel=2)
                    continue
                if eager:
                    refill()
                yield index, item
                del item  # not held while waiting for the next file
        finally:
            stop.set()
            for _, future in pending:
                future.cancel()
            files.shutdown(wait=True, cancel_futures=True)
            ranges.shutdown(wait=True, cancel_futures=True)

    def _deliver(self, item: _Item) -> Any:
        nb = self._pin
        states = [s.to(self.device, non_blocking=nb) for s in item.states]
        out: Any = dict(zip(self.hooks, states, strict=True)) if self.hooks else states[0]
        if not self.return_ids:
            return out
        return {
            "states": out,
            "input_ids": item.input_ids.to(torch.int64).to(self.device, non_blocking=nb),
            "positions": item.positions.to(self.device, non_blocking=nb),
        }

    def _iterate(self) -> Generator[Any, None, None]:
        stream = self._stream(self._next)
        try:
            for index, item in stream:
                self._next = index + 1
                yield self._deliver(item)
        finally:
            stream.close()
        self.epoch += 1
        self._next = 0

    def __iter__(self) -> Iterator[Any]:
        gen = self._iterate()
        self._active.add(gen)
        return gen

    # -- position and lifetime -------------------------------------------------------------------

    @property
    def current_file_index(self) -> int:
        """Index (in this rank's order) of the next file to yield."""
        return self._next

    def set_file_index(self, index: int) -> None:
        """Start the next iteration at file `index` of this rank's order."""
        if not 0 <= index <= len(self._order()):
            raise ConfigError(f"file index {index} is out of range [0, {len(self._order())}]")
        self._next = index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "file_index": self._next, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "rank", "world_size"):
            if state[k] != getattr(self, k):
                raise ConfigError(f"state was saved with {k}={state[k]}, this reader has {k}={getattr(self, k)}")
        self.epoch = int(state["epoch"])
        self.set_file_index(int(state["file_index"]))

    def finalize(self) -> None:
        """Stop background reading now (also done on leaving `with`)."""
        for gen in list(self._active):
            gen.close()

    def __enter__(self) -> RCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()


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
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = aws_access_key_id, aws_secret_access_key
        store_options = {"env": env, **({"unsigned": unsigned} if unsigned is not None else {})}
        store_options.update(options.pop("store_options", None) or {})
        prefixes = [s3_prefix] if isinstance(s3_prefix, str) else list(s3_prefix)
        super().__init__([f"s3://{bucket}/{p.strip('/')}" for p in prefixes], store_options=store_options, **options)

    @classmethod
    def from_credentials(cls, aws_access_key_id: str, aws_secret_access_key: str, *args: Any, **kwargs: Any) -> S3RCache:
        return cls(*args, aws_access_key_id=aws_access_key_id, aws_secret_access_key=aws_secret_access_key, **kwargs)
