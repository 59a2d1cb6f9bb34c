"""Token batches for training: TokenLoader (shuffled fixed-size batches; dataset.py wraps it).

Built on the megabatch stream (stream.py): a window of files is permuted with a seed and batches
are gathered from it with one copy, so a restarted loader resumes at the exact token.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch

from activault.errors import ConfigError, NotFoundError
from activault.reading.device import check_device, to_device
from activault.reading.fetch import ReadBuffers, Workers
from activault.reading.filters import FILTERS, FilteredFile, TokenMask, norm_limits
from activault.reading.options import (
    ReadArgs,
    ReadOptions,
    flag,
    invalid,
    keywords,
    positive,
    read_options,
    whole,
)
from activault.reading.order import mix_seed, position_after
from activault.reading.rcache import check_state
from activault.reading.stream import FileRef, FileStream, LoadedFile, Reader, Source
from activault.reading.window import (
    GATHER_THREADS,
    SHUFFLE,
    Batch,
    Window,
    permutation,
    ramp_windows,
    window_count,
    window_start,
)
from activault.vault import records
from activault.vault.stats import check_normalisable, merge_all

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


def _let_go_of_packed(f: FileRef, epoch: int, item: LoadedFile) -> LoadedFile:
    """A compressed file's ids and positions copied out of its compressed bytes (8 bytes a token),
    which are then let go of once decoded: a held file costs its decoded buffer alone."""
    if item.input_ids.untyped_storage().data_ptr() == item.states[0].untyped_storage().data_ptr():
        return item  # stored raw: every tensor is a view of the one fetched (or mapped) buffer
    docs = None if item.documents is None else item.documents.clone()
    return replace(item, input_ids=item.input_ids.clone(), positions=item.positions.clone(), documents=docs)


class TokenLoader(Reader):
    """Fixed-size batches of tokens `[batch_tokens, d]`, shuffled across a window of megabatches.

    Files are grouped in windows of `window` consecutive files (in the reader's order; with
    `ramp`, an epoch's first windows hold 1, 2, 4, ... files, so its first batch waits for one
    file, not `window`); a window's kept tokens are permuted with a seed, and batches are cut from
    the concatenation of permuted windows, so the stream is the same whether read in one go or
    resumed from `state_dict()`. Which tokens form a batch is random; within a batch they come in
    storage order (the gather is then one sequential copy, from the fetched, mapped or decoded
    buffers themselves).

    Memory: the window's files and `buffer_size` read ahead, one buffer each (a compressed file's
    decoded states; its compressed bytes are let go once decoded): at most
    (window + buffer_size + 1) x a decoded file, plus the batches, compressed or not.

    Filters (`token_filter=TokenFilter(...)`, a reading option: filters.py) leave tokens out of the
    batches at read time, by position range, a document's first stored tokens, token id, NaN or
    Inf, or L2 norm over k x the hook's median; `filtered` counts each filter's drops so far. The
    mask is computed once per file as it is loaded, so a filtered loader reads at the speed of an
    unfiltered one (docs/benchmarks.md), and `state_dict()` resumes exactly with filters on. A
    held-out split (`split="train"|"test"`, a reading option: splits.py) drops the other side's
    documents the same way, counted in `filtered["split"]`.

    Args:
        return_index: yield `{"states", "index"}` (with the ids, if asked, too): `index` is
            `[batch_tokens, 3]` int64, each token's (file, row, column), `file` an index into the
            loader's files that `indexed_file` turns into (run URI, file name): the coordinates
            `activault context RUN HOOK FILE ROW COL` (tools/context.py `token_context`) takes.
        drop_positions_below: drop tokens whose position in their document is below this (e.g. 1
            drops each document's first token, 2 after `clean_added_tokens`: `TokenFilter(first=1)`
            drops it either way); `TokenFilter(positions_below=...)`. Padding (position -1) is
            always dropped.
        center: subtract the per-dimension mean from `statistics.json`.
        norm_target: scale so the tokens' mean L2 norm equals this (e.g. `d ** 0.5`): from the
            exact mean norm in `statistics.json`, or, with `center`, the RMS norm of centred tokens
            (sqrt of the total variance, exact for the mean squared norm). Statistics leave out
            tokens with NaN or Inf (pass `drop_nonfinite=True` to drop the tokens too); statistics
            that counted them in (before stats_version 2) are a DataError naming the fix. The
            statistics are those of every finite stored token, whatever the filters drop: a filter
            is this reader's choice, the stored statistics describe the stored tokens, exactly and
            for every reader alike (an SAE trained on filtered tokens keeps the scale of the data).
        ramp: start each epoch with windows of 1, 2, 4, ... files up to `window` (the first
            batch after one file's read; those batches mix fewer files: docs/benchmarks.md);
            False: `window` files from the start (as loaders before the ramp cut them).
        drop_last: drop an epoch's last batch when it is short (`dropped_tokens` counts them);
            False yields it.
        loop: epochs without end, each in a new order (file order and windows seeded with the
            epoch); batches run across epoch boundaries and `state_dict()` stays exact.
        dtype: output dtype; default the stored one, or float32 when normalising.
        options, **read: how the files are read, as RCache's (ReadOptions: `seed`, `buffer_size`,
            `rank`, `world_size`, `skip_bad_files`, `store_options`, `range_size`,
            `verify_checksums`), `token_filter`, and `drop_nonfinite` (`TokenFilter(nonfinite=True)`:
            tokens with NaN or Inf in any hook are left out of the batches, counted in
            `nonfinite_dropped`); `preserve_file_order` defaults to False here.
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        *,
        batch_tokens: int,
        hooks: Sequence[str] | None = None,
        window: int = 4,
        ramp: bool = True,
        return_ids: bool = False,
        return_index: bool = False,
        drop_positions_below: int = 0,
        center: bool = False,
        norm_target: float | None = None,
        drop_last: bool = True,
        loop: bool = False,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        options: ReadOptions | None = None,
        **read: Unpack[ReadArgs],
    ):
        opts, _ = read_options("TokenLoader", options, read, own=keywords(TokenLoader.__init__, "uri", "options"))
        batch_tokens, window = whole("batch_tokens", batch_tokens), whole("window", window)
        drop_below = whole("drop_positions_below", drop_positions_below, 0)
        norm_target = None if norm_target is None else positive("norm_target", norm_target)
        return_ids, center = flag("return_ids", return_ids), flag("center", center)
        self.return_index = flag("return_index", return_index)
        ramp = flag("ramp", ramp)
        drop_last, loop = flag("drop_last", drop_last), flag("loop", loop)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise invalid("dtype", dtype, "a torch.dtype such as torch.float32, or None (the stored one)")
        self.device = check_device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        # The window's files and those read ahead are held at once: their buffers are reused.
        files = FileStream(uri, opts.ordered(False), hooks=hooks, held=window, transform=self._load)
        super().__init__(files)
        self.batch_tokens, self.window, self.ramp, self.return_ids = batch_tokens, window, ramp, return_ids
        self.drop_last, self.loop = drop_last, loop
        spec = opts.tokens
        self.token_filter = replace(spec, positions_below=max(spec.positions_below, drop_below))
        self.drop_below, self.drop_nonfinite = self.token_filter.positions_below, self.token_filter.nonfinite
        self.norm_limits = norm_limits(self.files.catalog.prefixes, self.token_filter, len(self.hooks or [""]))
        self.split = opts.held_out
        self._mask = TokenMask(self.token_filter, self.norm_limits, self.split)
        self._file_ids: dict[tuple[int, str], int] = {}  # (source, name) -> index (return_index)
        self._indexed: list[FileRef] = []
        self._blocks_indexed = 0
        self.epoch = 0
        self.dropped_tokens = 0  # the last epoch's short final batch, dropped (drop_last)
        self.filtered = dict.fromkeys(FILTERS, 0)  # tokens each filter left out so far
        self._window = self._offset = 0
        norm = [self._norm_params(h, center, norm_target) for h in range(len(self.hooks or [""]))]
        self._norm = [(None if m is None else m.to(self.device), scale) for m, scale in norm]
        self.dtype = dtype if dtype is not None else (torch.float32 if center or norm_target else None)

    @property
    def nonfinite_dropped(self) -> int:
        """Tokens with NaN or Inf left out so far (drop_nonfinite)."""
        return self.filtered["nonfinite"]

    def _load(self, f: FileRef, epoch: int, item: LoadedFile) -> FilteredFile:
        """On the reading thread: the file's packed bytes let go of, and its tokens filtered."""
        return self._mask.apply(_let_go_of_packed(f, epoch, item), self.files.catalog.prefixes[f.source].url(0, f.name))

    def _index_files(self) -> list[FileRef]:
        """Every file listed so far, in listing order (stable: `sync()` only appends blocks)."""
        blocks = self.files.catalog.blocks
        for block in blocks[self._blocks_indexed :]:
            for ref in block:
                self._file_ids[ref.source, ref.name] = len(self._indexed)
                self._indexed.append(ref)
        self._blocks_indexed = len(blocks)
        return self._indexed

    def _file_id(self, f: FileRef) -> int:
        if (f.source, f.name) not in self._file_ids:
            self._index_files()
        return self._file_ids[f.source, f.name]

    def indexed_file(self, file: int) -> tuple[str, str]:
        """(run URI, file name) of `file`, the first coordinate of a batch's `index` (return_index):
        with a hook and the row and column, what `token_context` takes. The URI is the store's own
        for a Store given without `hooks` (it has no run folder above it)."""
        files = self._index_files()
        if isinstance(file, bool) or not 0 <= file < len(files):
            raise ConfigError(f"file {file!r} is not an index of this loader's files (0..{len(files) - 1})")
        ref = files[file]
        prefix = self.files.catalog.prefixes[ref.source]
        store = prefix.records if prefix.records is not None else prefix.store
        return store.url(""), ref.name

    def _norm_params(self, h: int, center: bool, target: float | None) -> tuple[torch.Tensor | None, float]:
        if not center and target is None:
            return None, 1.0
        parts = []
        for prefix in self.files.catalog.prefixes:
            found = records.read_statistics(prefix.store, prefix.folders[h])  # typed, errors named
            if found is None:
                url = prefix.store.url(records.statistics_key(prefix.folders[h]))
                raise NotFoundError(
                    f"{url} does not exist; normalisation needs the run's statistics ({records.REMERGE})"
                )
            parts.append(check_normalisable(found.running(), prefix.store.url(prefix.folders[h])))
        stats = merge_all(parts)
        assert stats is not None
        if stats.nonfinite_tokens and not self.drop_nonfinite:
            log.warning(
                "%s: %d token(s) with NaN or Inf are left out of the statistics but still delivered "
                "(as NaN or Inf); drop_nonfinite=True drops them",
                ", ".join(p.store.url(p.folders[h]) for p in self.files.catalog.prefixes),
                stats.nonfinite_tokens,
            )
        mean = stats.mean.to(torch.float32) if center else None
        if target is None:
            return mean, 1.0
        ref = math.sqrt(float(stats.var.sum())) if center else stats.mean_norm
        return mean, target / ref

    def _batch(self, states: list[torch.Tensor], buffers: ReadBuffers) -> Batch:
        B = self.batch_tokens
        ids = [buffers.empty((B,), torch.int32) for _ in range(2)] if self.return_ids else [None, None]
        index = buffers.empty((B, 3), torch.int64) if self.return_index else None
        return Batch([buffers.empty((B, s.shape[-1]), s.dtype) for s in states], ids[0], ids[1], index=index)

    def _normalise(self, s: torch.Tensor, h: int, buffers: ReadBuffers | None) -> torch.Tensor:
        """`s: [tokens, d]` centred, scaled and cast as asked, in as few passes as give the same
        float32 values (into recycled CPU buffers, or new tensors on the device)."""
        mean, scale = self._norm[h]
        if mean is None and scale == 1.0:
            if self.dtype is None or self.dtype == s.dtype:
                return s
            return s.to(self.dtype) if buffers is None else buffers.empty(s.shape, self.dtype).copy_(s)
        out = (
            torch.empty(s.shape, dtype=torch.float32, device=s.device)
            if buffers is None
            else buffers.empty(s.shape, torch.float32)
        )
        if mean is not None:
            torch.sub(s, mean, out=out)  # bf16 - float32: promoted exactly, one pass
        else:
            out.copy_(s)
        if scale != 1.0:
            out.mul_(scale)
        return out if self.dtype in (None, torch.float32) else out.to(self.dtype)

    def _deliver(self, batch: Batch, buffers: ReadBuffers) -> Any:
        n = batch.filled
        states = [s[:n] for s in batch.states]
        cpu = self.device.type == "cpu"
        if cpu:  # normalised into recycled buffers
            states = [self._normalise(s, h, buffers) for h, s in enumerate(states)]
        extra = [t[:n] for t in (batch.input_ids, batch.positions, batch.index) if t is not None]
        moved = to_device([*states, *extra], self.device, buffers)
        out = moved[: len(states)]
        if not cpu:  # the stored dtype went through the pinned batch buffer; the device normalises
            out = [self._normalise(s, h, None) for h, s in enumerate(out)]
        st: Any = dict(zip(self.hooks, out, strict=True)) if self.hooks else out[0]
        if not extra:
            return st
        got: dict[str, Any] = {"states": st}
        rest = moved[len(states) :]
        if self.return_ids:
            got.update(input_ids=rest[0].to(torch.int64), positions=rest[1])
        if self.return_index:
            got["index"] = rest[-1]
        return got

    def _iterate(self) -> Generator[Any, None, None]:
        gatherers = Workers(GATHER_THREADS - 1, "activault-gather") if GATHER_THREADS > 1 else None
        # Stopped when the batches end or are abandoned, and at interpreter exit before modules are
        # torn down (an abandoned generator may be collected only after that).
        stop = weakref.finalize(self, Workers.close, gatherers) if gatherers is not None else None
        try:
            yield from self._batches(gatherers)
        finally:
            if stop is not None:
                stop()

    def _batches(self, gatherers: Workers | None) -> Generator[Any, None, None]:
        B = self.batch_tokens
        # Staged in pinned memory for CUDA (the device normalises); 4: a consumer may hold the last
        # batch while the next is gathered.
        buffers = ReadBuffers(self._pin, keep=4 * (2 + len(self._norm)), recycle=self.files.buffers.recycle)
        epoch, start, skip = self.epoch, self._window, self._offset
        batch: Batch | None = None  # filled across windows (and epochs, with loop): tokens stay in place
        while True:
            taken = 0
            with self.files.prefetch(epoch, window_start(start, self.window, self.ramp), eager=True) as files:
                for w, items in ramp_windows(files, self.window, self.ramp):
                    kept = cast(list[FilteredFile], items)  # FilteredFile: made by self._load
                    ids = [self._file_id(item.file) for item in kept] if self.return_index else []
                    win = Window(kept, ids)
                    del kept
                    del items
                    for name, n in win.dropped.items():
                        self.filtered[name] += n
                    if skip and skip >= win.n:  # the offset's bound, known now: the window's kept tokens
                        raise ConfigError(
                            f"TokenLoader state: field 'offset' is {skip}, not a whole number 0..{max(win.n - 1, 0)}"
                            f" (window {w} of epoch {epoch} holds {win.n} tokens): the state was saved by a loader "
                            "of other files, or with other filters (drop_positions_below, drop_nonfinite, "
                            "token_filter, split)"
                        )
                    perm = permutation(win.n, mix_seed(self.seed, epoch, "window", w))
                    a, skip = skip, 0
                    taken += win.n - a
                    while a < win.n:
                        if batch is None:
                            batch = self._batch([per_file[0] for per_file in win.states], buffers)
                        take = min(B - batch.filled, win.n - a)
                        win.gather(perm[a : a + take], batch, gatherers)
                        a += take
                        if batch.filled == B:
                            # The position of the next token: what state_dict() resumes from.
                            self.epoch, (self._window, self._offset) = epoch, position_after(w, a, win.n)
                            full, batch = batch, None
                            yield self._deliver(full, buffers)
                            del full
                    del win, perm  # free this window before the next one is assembled
            fresh = start == 0 and skip == 0
            epoch, start = epoch + 1, 0
            if not self.loop:
                break
            if taken == 0 and fresh:
                raise ConfigError(
                    f"an epoch of this loader holds no tokens (rank {self.rank} of "
                    f"{self.world_size}): loop=True would wait forever; use a smaller "
                    "world_size or a run with more files"
                )
        self.epoch, self._window, self._offset = epoch, 0, 0
        self.dropped_tokens = 0
        if batch is not None and not self.drop_last:
            yield self._deliver(batch, buffers)
        elif batch is not None:
            self.dropped_tokens = batch.filled
            log.info(
                "dropped the last %d tokens of epoch %d (fewer than batch_tokens=%d); "
                "drop_last=False yields them as a short batch",
                batch.filled,
                epoch - 1,
                B,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "window": self._window,
            "offset": self._offset,
            "seed": self.seed,
            "window_files": self.window,
            "ramp": self.ramp,
            "batch_tokens": self.batch_tokens,
            "drop_nonfinite": self.drop_nonfinite,
            "token_filter": self.token_filter.describe(),
            "norm_limits": self.norm_limits,
            "split": None if self.split is None else self.split.describe(),
            "shuffle": SHUFFLE,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` (from `state_dict()` of a loader with the same seed, window, ramp
        and batch_tokens) was saved. Each position field is bounded: `epoch` by 2**63 - 1,
        `window` by the epoch's windows, `offset` by the window's tokens (checked once the window
        is read: its kept tokens are known only then)."""
        check_state(state, "TokenLoader", {k: (0, None) for k in ("epoch", "window", "offset")})
        for k in ("seed", "window_files", "batch_tokens"):
            if k not in state:
                raise ConfigError(f"not a TokenLoader state_dict: no {k}")
        for k, mine in (
            ("seed", self.seed),
            ("window_files", self.window),
            ("ramp", self.ramp),
            ("batch_tokens", self.batch_tokens),
            ("drop_nonfinite", self.drop_nonfinite),
        ):
            saved = state.get(k, False)  # ramp and drop_nonfinite are absent from states saved before them
            if saved != mine:
                arg = "window" if k == "window_files" else k
                raise ConfigError(
                    f"state was saved with {k}={saved}, this loader has {mine}: "
                    f"make the loader with {arg}={saved} to resume it"
                )
        self._check_filters(state)
        epoch = int(check_state(state, "TokenLoader", {"epoch": (0, 2**63 - 1)})["epoch"])
        count = window_count(len(self.files.order(epoch)), self.window, self.ramp)
        check_state(state, "TokenLoader", {"window": (0, count)})
        # At the epoch's end (window == count) no token is left: only offset 0 can follow.
        check_state(state, "TokenLoader", {"offset": (0, 0 if int(state["window"]) == count else 2**63 - 1)})
        shuffle = state.get("shuffle", "torch-randperm")  # saved before the key existed
        if shuffle != SHUFFLE and state["offset"]:
            raise ConfigError(
                f"state was saved mid-window by a loader that shuffled with {shuffle!r}; this one uses "
                f"{SHUFFLE!r}, so the rest of that window would repeat and skip tokens: resume from a "
                "state saved at a window boundary (offset 0), or with the activault that saved it"
            )
        self.epoch, self._window, self._offset = epoch, int(state["window"]), int(state["offset"])

    def _check_filters(self, state: dict[str, Any]) -> None:
        """The same tokens kept as when `state` was saved (states saved before filters: unchecked)."""
        split = None if self.split is None else self.split.describe()
        if state.get("split") != split:  # states saved before splits had none
            raise ConfigError(
                f"state was saved with split {state.get('split')}, this loader has {split}: make the loader "
                "with the same split, test_fraction and split_seed to resume it"
            )
        if "token_filter" not in state:
            return
        saved, mine = state["token_filter"], self.token_filter.describe()
        if saved != mine:
            raise ConfigError(
                f"state was saved with token_filter={saved}, this loader has {mine}: make the loader "
                "with the same filters (token_filter, drop_positions_below, drop_nonfinite) to resume it"
            )
        limits = state.get("norm_limits", [])
        if limits != self.norm_limits:
            raise ConfigError(
                f"state was saved with norm limits {limits} (max_norm_ratio x each hook's median norm), "
                f"this loader has {self.norm_limits}: the run's statistics changed since (machines merged "
                "in), so resuming would drop other tokens than the saved loader did: start a new loader (no "
                "load_state_dict) to read with the new statistics"
            )

    def __enter__(self) -> TokenLoader:
        return self
