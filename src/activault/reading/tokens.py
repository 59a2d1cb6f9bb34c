"""Token batches for training: TokenLoader (shuffled fixed-size batches; dataset.py wraps it).

Built on the megabatch stream (stream.py): a window of files is permuted with a seed and batches
are gathered from it with one copy, so a restarted loader resumes at the exact token.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from activault.errors import ConfigError
from activault.reading.batches import Delivery
from activault.reading.device import check_device
from activault.reading.fetch import ReadBuffers
from activault.reading.filters import FILTERS, FilteredFile, TokenMask, norm_limits
from activault.reading.listing import StatesShape
from activault.reading.loader_state import (
    PROGRESSIVE,
    Settings,
    load_mixture,
    load_position,
    mixture_state,
    position_state,
)
from activault.reading.mixing import (
    NORMALIZE,
    Feed,
    Normalize,
    check_mixable,
    feed_strata,
    mix_weights,
    norm_params,
    quotas,
)
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
from activault.reading.order import position_after
from activault.reading.stream import FileRef, FileStream, LoadedFile, Reader, Source
from activault.reading.window import (
    GATHER_THREADS,
    Batch,
    Take,
    drawn_windows,
    take_rows,
    window_count,
    window_start,
)
from activault.reading.workers import Workers
from activault.storage import Store

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


def _no_ids(items: list[FilteredFile]) -> list[int]:
    return []


class TokenLoader(Reader):
    """Fixed-size batches of tokens `[batch_tokens, d]`, shuffled across a window of megabatches.

    Files are grouped in windows of `window` consecutive files (in the reader's order); a window's
    kept tokens are permuted with a seed, stratified so that a batch takes at most one token from
    each `window tokens / batch_tokens` neighbours (window.py `stratified`: no two tokens of one
    document while the window holds more documents than a batch has tokens), and batches are cut
    from the concatenation of permuted windows, so the stream is the same whether read in one go or
    resumed from `state_dict()`. With `ramp`, an epoch's first window is drawn as its files arrive,
    so the first batch waits for one file, not `window`. Within a batch the tokens come in storage
    order (the gather is then one sequential copy, from the fetched, mapped or decoded buffers
    themselves).

    Shuffle quality against memory: `window` is the knob. A batch mixes the documents of `window`
    files; the same-document pair rate (tools/shuffle_quality.py) is under 2x an ideal shuffle's
    with the defaults on a 16-file run, and grows with the run's size over the window's, which
    `activault shuffle` removes (docs/benchmarks.md: TokenLoader: shuffle quality).

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
        ramp: draw each epoch's first window as its files arrive (the first batch after one
            file's read: max(a file's tokens // window, batch_tokens) tokens a file from those
            loaded, the rest once the window is complete; those first batches mix fewer files);
            False: wait for the whole window. A mixture's runs (weights=) draw theirs the same way.
        drop_last: drop an epoch's last batch when it is short (`dropped_tokens` counts them);
            False yields it.
        loop: epochs without end, each in a new order (file order and windows seeded with the
            epoch); batches run across epoch boundaries and `state_dict()` stays exact.
        dtype: output dtype; default the stored one, or float32 when normalising.
        weights: read the runs in `uri` (one source, or a list of one run's prefixes, per weight) as a
            mixture (mixing.py): batch k holds `quotas(k)` tokens of each run, in run order, so over
            any span of whole batches each run's share is within 2 tokens of its weight; each run is
            shuffled in its own windows of `window` files (memory: runs x window files; a smaller
            `window` reads faster and mixes fewer documents: docs/benchmarks.md, "Mixing: the cost
            is the second window"), and one exhausted restarts its own next epoch (new order), so
            the weights hold forever; `loop=False` ends once every run was read whole once. Runs
            must share hook names, width and dtype (checked before reading). Without weights a list
            is one dataset's prefixes, concatenated. `return_index` is not available with weights.
        normalize: "per_run" (the default with weights: `center`/`norm_target` from each run's own
            statistics, so two models' or datasets' activations each reach the target, none scaled
            by the larger) or "pooled" (the runs' statistics merged).
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
        weights: Sequence[float] | None = None,
        normalize: Normalize | None = None,
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
        runs = self._runs_of(uri, weights)
        # The window's files and those read ahead are held at once: their buffers are reused.
        self._runs = [
            FileStream(u, opts.ordered(False), hooks=hooks, held=window, transform=partial(self._load, i))
            for i, u in enumerate(runs)
        ]
        super().__init__(self._runs[0])
        names = [self._run_name(r) for r in self._runs]
        self.weights = None if weights is None else mix_weights(weights, len(runs), batch_tokens, names)
        if normalize is not None and normalize not in NORMALIZE:
            raise invalid("normalize", normalize, " or ".join(map(repr, NORMALIZE)))
        if normalize == "per_run" and self.weights is None:
            raise ConfigError(
                "normalize='per_run' needs weights=: a list of URIs without weights is one dataset's prefixes, "
                "normalised together; pass weights=[...] to read them as a mixture of runs"
            )
        # Per run by default: a mixture of two models' (or datasets') activations would otherwise be
        # scaled by the larger one's statistics, and the smaller run's tokens would all but vanish.
        self.normalize: Normalize = normalize or ("per_run" if self.weights is not None else "pooled")
        if self.weights is not None:
            if return_index:
                raise ConfigError("return_index=True is not available with weights= (a mixture of runs) yet")
            check_mixable(names, [r.catalog.prefixes[0].hooks for r in self._runs], [r.shapes for r in self._runs])
        self.batch_tokens, self.window, self.ramp, self.return_ids = batch_tokens, window, ramp, return_ids
        self.drop_last, self.loop = drop_last, loop
        spec = opts.tokens
        self.token_filter = replace(spec, positions_below=max(spec.positions_below, drop_below))
        self.drop_below, self.drop_nonfinite = self.token_filter.positions_below, self.token_filter.nonfinite
        n_hooks = len(self.hooks or [""])
        self._limits = [norm_limits(r.catalog.prefixes, self.token_filter, n_hooks) for r in self._runs]
        self.norm_limits = self._limits[0]  # a mixture's runs each have their own (state_dict: all)
        self.split = opts.held_out
        self._masks = [TokenMask(self.token_filter, lim, self.split) for lim in self._limits]
        self._file_ids: dict[tuple[int, str], int] = {}  # (source, name) -> index (return_index)
        self._indexed: list[FileRef] = []
        self._blocks_indexed = 0
        self.epoch = 0
        self.dropped_tokens = 0  # the last epoch's short final batch, dropped (drop_last)
        self.filtered = dict.fromkeys(FILTERS, 0)  # tokens each filter left out so far
        self._window = self._offset = 0
        self._mixed = 0  # a mixture's batches so far: where its schedule is
        self._positions = [(0, 0, 0)] * len(self._runs)  # a mixture's runs' (epoch, window, offset)
        pooled = [p for r in self._runs for p in r.catalog.prefixes]
        groups = [pooled] if self.normalize == "pooled" else [r.catalog.prefixes for r in self._runs]
        self._norm = [  # [hook][run]: (mean on the device, scale)
            [
                (None if m is None else m.to(self.device), scale)
                for m, scale in (norm_params(g, h, center, norm_target, self.drop_nonfinite) for g in groups)
            ]
            * (len(self._runs) if self.normalize == "pooled" else 1)
            for h in range(n_hooks)
        ]
        self.dtype = dtype if dtype is not None else (torch.float32 if center or norm_target else None)
        self._out = Delivery(
            self.hooks, self._norm, self.dtype, self.device, batch_tokens, return_ids, self.return_index
        )

    @property
    def run_files(self) -> list[FileStream]:
        """Each run's files, in the order of `weights` (one run without weights)."""
        return list(self._runs)

    @property
    def bad_files(self) -> int:
        return sum(r.bad_files for r in self._runs)

    def sync(self) -> int:
        return sum(r.sync() for r in self._runs)

    @property
    def nonfinite_dropped(self) -> int:
        """Tokens with NaN or Inf left out so far (drop_nonfinite)."""
        return self.filtered["nonfinite"]

    @staticmethod
    def _runs_of(uri: Source | Sequence[Source], weights: Sequence[float] | None) -> list[Any]:
        """The sources of each run: the whole list is one run (several prefixes of one dataset)
        unless `weights` are given; then each item is one run (a source, or a list of its prefixes)."""
        if weights is None:
            return [uri]
        if isinstance(uri, str | Path | Store) or not isinstance(uri, Sequence):
            raise invalid("uri", uri, "a list of runs (one URI, or a list of one run's URIs, per weight) with weights=")
        return list(uri)

    @staticmethod
    def _run_name(files: FileStream) -> str:
        return ", ".join(p.store.url(p.folders[0]) for p in files.catalog.prefixes)

    def _load(self, run: int, f: FileRef, epoch: int, item: LoadedFile) -> FilteredFile:
        """On the reading thread: the file's packed bytes let go of, and its tokens filtered."""
        url = self._runs[run].catalog.prefixes[f.source].url(0, f.name)
        return self._masks[run].apply(_let_go_of_packed(f, epoch, item), url)

    def _index_files(self) -> list[FileRef]:
        """Every file listed so far, in listing order (stable: `sync()` only appends blocks)."""
        blocks = self.files.catalog.blocks
        for block in blocks[self._blocks_indexed :]:
            for ref in block:
                self._file_ids[ref.source, ref.name] = len(self._indexed)
                self._indexed.append(ref)
        self._blocks_indexed = len(blocks)
        return self._indexed

    def _count(self, dropped: dict[str, int]) -> None:
        for name, n in dropped.items():
            self.filtered[name] += n

    def _ids_of(self, items: list[FilteredFile]) -> list[int]:
        return [self._file_id(item.file) for item in items]

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

    def _iterate(self) -> Generator[Any, None, None]:
        gatherers = Workers(GATHER_THREADS - 1, "activault-gather") if GATHER_THREADS > 1 else None
        # Stopped when the batches end or are abandoned, and at interpreter exit before modules are
        # torn down (an abandoned generator may be collected only after that).
        stop = weakref.finalize(self, Workers.close, gatherers) if gatherers is not None else None
        try:
            yield from (self._batches(gatherers) if self.weights is None else self._mixture(gatherers))
        finally:
            if stop is not None:
                stop()

    def _batches(self, gatherers: Workers | None) -> Generator[Any, None, None]:
        B = self.batch_tokens
        # Staged in pinned memory for CUDA (the device normalises); 4: a consumer may hold the last
        # batch while the next is gathered.
        buffers = self._batch_buffers()
        epoch, start, skip = self.epoch, self._window, self._offset
        batch: Batch | None = None  # filled across windows (and epochs, with loop): tokens stay in place
        while True:
            taken = 0
            # The plain loader's windows are `window` files each; its ramp draws the first one's
            # tokens as its files arrive (window.py: drawn_windows).
            with self.files.prefetch(epoch, window_start(start, self.window), eager=True) as files:
                kept = cast(Iterable[tuple[int, FilteredFile]], files)  # FilteredFile: made by self._load
                ids = self._ids_of if self.return_index else _no_ids
                for d in drawn_windows(kept, self.window, self.ramp, B, self.seed, epoch, skip, ids, self._count):
                    taken += d.order.size - d.start
                    a = d.start
                    while a < d.order.size:
                        if batch is None:
                            batch = self._out.empty([(f[0].shape[-1], f[0].dtype) for f in d.win.states], buffers)
                        take = min(B - batch.filled, d.order.size - a)
                        d.win.gather(d.order[a : a + take], batch, gatherers)
                        a += take
                        if batch.filled == B:
                            # The position of the next token: what state_dict() resumes from.
                            at = d.done + a  # an incomplete window has tokens left past `at`
                            self._window, self._offset = position_after(d.w, at, d.win.n if d.complete else at + 1)
                            self.epoch, full, batch = epoch, batch, None
                            yield self._out.deliver(full, buffers)
                            del full
                    del d
                skip = 0
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
            yield self._out.deliver(batch, buffers)
        elif batch is not None:
            self.dropped_tokens = batch.filled
            log.info(
                "dropped the last %d tokens of epoch %d (fewer than batch_tokens=%d); "
                "drop_last=False yields them as a short batch",
                batch.filled,
                epoch - 1,
                B,
            )

    def _batch_buffers(self) -> ReadBuffers:
        """Recycled buffers for the batches: a consumer holds the last batch while the next is gathered,
        so two batches' buffers (states, and their normalised copies) are faulted in ahead, no more."""
        per_batch = len(self._norm) * (1 if self.dtype is None else 2)
        return ReadBuffers(
            self._pin, keep=4 * (2 + len(self._norm)), recycle=self.files.buffers.recycle, ahead=2 * per_batch
        )

    def _mixture(self, gatherers: Workers | None) -> Generator[Any, None, None]:
        """A mixture's batches: batch k takes `quotas(k)` tokens of each run, in run order, each run
        from its own shuffled windows (restarting its own epoch when exhausted)."""
        assert self.weights is not None
        buffers = self._batch_buffers()
        rows = [(s.d_model, s.dtype) for s in cast(list[StatesShape], self.shapes)]  # check_mixable: known

        names = [self._run_name(r) for r in self._runs]
        strata = [feed_strata(w, self.batch_tokens) for w in self.weights]
        feeds = [
            Feed(r, names[i], self.window, self.ramp, strata[i], self._positions[i], self._count)
            for i, r in enumerate(self._runs)
        ]
        try:
            # loop=False: the batches end once every run has been read whole (epoch 0) at least once.
            while self.loop or not all(f.done(0) for f in feeds):
                batch, parts = self._out.empty(rows, buffers), []
                takes: list[Take] = []
                for r, n in enumerate(quotas(self.weights, self.batch_tokens, self._mixed)):
                    a = batch.filled
                    feeds[r].take(batch, n, gatherers, takes)
                    parts.append((a, batch.filled, r))
                take_rows(takes, gatherers)  # every run's share in one split over the threads
                del takes
                self._mixed += 1
                self._positions = [f.position for f in feeds]
                yield self._out.deliver(batch, buffers, parts)
                del batch
        finally:
            for f in feeds:
                f.close()

    def state_dict(self) -> dict[str, Any]:
        if self.weights is not None:
            return mixture_state(self._settings(), self.weights, self._mixed, self._positions)
        return position_state(self._settings(), self.epoch, self._window, self._offset)

    def _settings(self) -> Settings:
        # The ramp draws an epoch's first window as the files arrive (a mixture's runs too).
        return Settings(
            seed=self.seed,
            window=self.window,
            ramp=PROGRESSIVE if self.ramp else self.ramp,
            batch_tokens=self.batch_tokens,
            drop_nonfinite=self.drop_nonfinite,
            token_filter=self.token_filter.describe(),
            norm_limits=self.norm_limits if self.weights is None else self._limits,
            split=None if self.split is None else self.split.describe(),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` (from `state_dict()` of a loader with the same seed, window, ramp
        and batch_tokens) was saved. Each position field is bounded: `epoch` by 2**63 - 1,
        `window` by the epoch's windows, `offset` by the window's tokens (checked once the window
        is read: its kept tokens are known only then). A mixture's state has each run's position
        (loader_state.py)."""
        if self.weights is not None or (isinstance(state, Mapping) and "mixture" in state):
            windows = [partial(self._windows, r) for r in self._runs]
            self._mixed, self._positions = load_mixture(state, self._settings(), self.weights, windows)
            return
        # The ramp draws the first window as its files arrive: it cuts no windows of its own.
        self.epoch, self._window, self._offset = load_position(
            state, self._settings(), partial(self._windows, self.files)
        )

    def _windows(self, files: FileStream, epoch: int) -> int:
        return window_count(len(files.order(epoch)), self.window)

    def __enter__(self) -> TokenLoader:
        return self
