"""TokenLoader's shuffle window: which files form window w (`window_stages`: `size` files each, an
epoch's first drawn as its files arrive, for a lone loader and each run of a mixture alike), its
tokens indexed without copying them together, the stratified permutation, and the one gather into
a batch.

The partition into windows, and the order a window's tokens are drawn in, are pure functions of
(file index, window size, ramp, the files' kept tokens, seed): a resumed loader cuts and draws the
same windows as an uninterrupted one. `same_source_pairs` is the shuffle-quality measure
(tools/shuffle_quality.py; docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from numpy.random import PCG64

from activault.errors import ConfigError
from activault.reading.filters import FILTERS, FilteredFile
from activault.reading.order import mix_seed
from activault.reading.workers import Workers

T = TypeVar("T")

# How a window is shuffled: state_dict() records it, as a resume mid-window needs the same order.
# numpy's PCG64, not torch.randperm: randperm fills its range with an OpenMP team whose idle thread
# then spins for milliseconds on a core the gather needs. State dicts without the key were saved
# by loaders that used torch.randperm. SHUFFLE: a uniform permutation of the window (a mixture's
# runs); STRATIFIED: `stratified`, TokenLoader's own since the second shuffle-quality session.
SHUFFLE = "numpy-pcg64"
STRATIFIED = "numpy-pcg64-strata"

# Threads that gather a batch (with the consumer's own): one thread copies rows at about half the
# rate two cores read files from the page cache.
GATHER_THREADS = max(1, min(4, os.cpu_count() or 1))


# -- which files form a window ---------------------------------------------------------------------


def window_start(w: int, size: int) -> int:
    """The index of window `w`'s first file in the epoch's order (where a resumed loader starts)."""
    return w * size


def window_count(files: int, size: int) -> int:
    """Windows of an epoch of `files` files, `size` each (the last may be short)."""
    return -(-max(files, 0) // size)


def window_stages(files: Iterable[tuple[int, T]], size: int, progressive: bool) -> Iterator[tuple[int, list[T], bool]]:
    """(window, its items so far, complete) of (file index, item) pairs in order, `size` files a
    window. With `progressive`, an epoch's first window is also handed over at each of its files
    before the last (complete False): its first tokens are drawn from the files loaded so far
    (`Draws`), so the first batch waits for one file, not `size`.
    """
    items: list[T] = []
    w = -1
    for index, item in files:
        if items and index // size != w:  # the window's last file was skipped as bad
            yield w, items, True
            items = []
        w = index // size
        items.append(item)
        del item
        if index % size == size - 1:
            yield w, items, True
            items = []  # dropped before the next file is awaited
        elif progressive and w == 0:
            yield w, items, False
    if items:
        yield w, items, True


class Draws:
    """The order one window's tokens are drawn in, stage by stage: while its files arrive (a
    progressive first window), each file lets max(its tokens // size, strata) tokens be drawn from
    those loaded and not drawn yet; once complete, every token left. Each stage's order is
    `stratified`, so a window drawn in one stage is `stratified(n, strata, seed)` itself."""

    def __init__(self, strata: int, size: int):
        self.strata, self.size = strata, size
        self.taken = np.zeros(0, bool)

    def stage(self, n: int, newest: int, complete: bool, seed: int) -> np.ndarray:
        """The window tokens drawn next, of the first `n` (the files so far; `newest`: the last's)."""
        if not self.taken.any() and complete:
            return stratified(n, self.strata, seed)
        taken = np.zeros(n, bool)
        taken[: self.taken.size] = self.taken
        left = np.flatnonzero(~taken)
        k = left.size if complete else min(left.size, max(newest // self.size, self.strata))
        out = left[stratified(left.size, self.strata, seed)[:k]]
        taken[out] = True
        self.taken = taken
        return out


@dataclass
class Drawn:
    """One stage of a window: its files so far, the tokens drawn now (window indices, in order),
    from `start` on (those before the state's offset skipped), `done` drawn before them."""

    w: int
    win: Window
    order: np.ndarray
    start: int
    done: int
    complete: bool


def drawn_windows(
    files: Iterable[tuple[int, FilteredFile]],
    size: int,
    progressive: bool,
    strata: int,
    seed: int,
    epoch: int,
    skip: int,
    file_ids: Callable[[list[FilteredFile]], list[int]],
    count: Callable[[dict[str, int]], None],
) -> Iterator[Drawn]:
    """An epoch's windows (from the one `files` starts at) stage by stage (`window_stages`), each
    stage's tokens drawn by `Draws`, seeded by (seed, epoch, window, the files so far unless
    complete). The first `skip` tokens of the window `files` starts at (a resumed state's offset)
    are passed over; `count`: each file's drops, once, as it arrives."""
    draws, at, seen = Draws(strata, size), 0, 0
    for w, items, complete in window_stages(files, size, progressive):
        for item in items[seen:]:
            count(item.dropped)
        win, seen = Window(items, file_ids(items)), 0 if complete else len(items)
        del items
        if complete and skip and skip >= win.n:  # the offset's bound, known now: the window's kept tokens
            raise ConfigError(
                f"TokenLoader state: field 'offset' is {skip}, not a whole number 0..{max(win.n - 1, 0)}"
                f" (window {w} of epoch {epoch} holds {win.n} tokens): the state was saved by a loader "
                "of other files, or with other filters (drop_positions_below, drop_nonfinite, "
                "token_filter, split)"
            )
        newest = int(win.offsets[-1] - win.offsets[-2])
        stage = (seed, epoch, "window", w) + (() if complete else ("stage", len(win.kept)))
        order = draws.stage(win.n, newest, complete, mix_seed(*stage))
        yield Drawn(w, win, order, min(max(skip - at, 0), order.size), at, complete)
        at += order.size
        if complete:
            draws, at, skip = Draws(strata, size), 0, 0
        del win, order  # free this window before the next one is assembled


# -- shuffle quality -------------------------------------------------------------------------------


def same_source_pairs(sources: np.ndarray) -> float:
    """The fraction of a batch's token pairs that come from the same source (file or document):
    1.0 for a batch from one file; an ideal shuffle gives `uniform_same_source_pairs`."""
    n = sources.size
    if n < 2:
        return 0.0
    counts = np.unique(sources, return_counts=True)[1].astype(np.float64)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def uniform_same_source_pairs(counts: np.ndarray) -> float:
    """The same fraction for a uniform shuffle of all tokens (`counts`: tokens per source)."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    return float((c * (c - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


# -- the window's tokens and the gather ------------------------------------------------------------


Take = tuple[np.ndarray, np.ndarray, np.ndarray]  # (source rows, which of them, into): one np.take


@dataclass
class Batch:
    states: list[torch.Tensor]  # per hook [batch_tokens, d]
    input_ids: torch.Tensor | None  # [batch_tokens] int32; None unless return_ids
    positions: torch.Tensor | None  # [batch_tokens] int32; None unless return_ids
    filled: int = 0
    index: torch.Tensor | None = None  # [batch_tokens, 3] int64 (file, row, column); None unless return_index


def _bytes(x: torch.Tensor) -> np.ndarray:
    """`x: [n, ...]` as a numpy view `[n, row_bytes]` of uint8 (numpy has no bfloat16)."""
    return x.reshape(x.shape[0], -1).view(torch.uint8).numpy()


class Window:
    """The kept tokens of a window of megabatches, indexed 0..n-1 without copying them together:
    the gather reads the files' own buffers (the fetched or mapped bytes, or the decoded states).
    Which tokens are kept was decided per file on loading (filters.py: `FilteredFile.kept`).
    `file_ids`: each file's index in the reader's file list, for the batches' coordinates."""

    def __init__(self, items: list[FilteredFile], file_ids: Sequence[int] = ()):
        self.file_ids = list(file_ids)
        self.seq = [item.input_ids.shape[-1] for item in items]
        self.states: list[list[torch.Tensor]] = [[] for _ in items[0].states]  # per hook, per file: [tokens, d]
        self.rows: list[list[np.ndarray]] = [[] for _ in items[0].states]  # the same as [tokens, row_bytes] uint8
        self.ids, self.pos = [], []
        self.kept: list[np.ndarray | None] = []
        self.dropped = dict.fromkeys(FILTERS, 0)  # tokens each filter dropped from the window's files
        counts = []
        for item in items:
            p = item.positions.reshape(-1)
            self.ids.append(item.input_ids.reshape(-1))
            self.pos.append(p)
            for h, s in enumerate(item.states):
                self.states[h].append(s.reshape(p.numel(), -1))
                self.rows[h].append(_bytes(self.states[h][-1]))
            for name, n in item.dropped.items():
                self.dropped[name] += n
            counts.append(p.numel() if item.kept is None else item.kept.size)
            self.kept.append(item.kept)
        self.offsets = np.cumsum([0, *counts])
        self.n = int(self.offsets[-1])

    def gather(
        self, index: np.ndarray, batch: Batch, workers: Workers | None = None, defer: list[Take] | None = None
    ) -> None:
        """Append tokens `index` to the batch: one copy, file by file (in storage order), split
        over `workers` (and this thread) when given; with `defer`, the states' copies are added to
        it for one `take_rows` later (a mixture's runs: one split of the batch over the threads,
        not one per run), the window's buffers held by them meanwhile."""
        index = np.sort(index)  # 15 us for 4,096 indices; torch.sort took 130 us (a 2.5 ms batch here)
        bounds = np.searchsorted(index, self.offsets).tolist()
        start = batch.filled
        takes: list[Take] = []
        for f, kept in enumerate(self.kept):
            lo, hi = bounds[f], bounds[f + 1]
            if lo == hi:
                continue
            rows = index[lo:hi] - self.offsets[f]
            if kept is not None:
                rows = kept[rows]
            for h, per_file in enumerate(self.rows):
                takes.append((per_file[f], rows, _bytes(batch.states[h][start + lo : start + hi])))
            if batch.input_ids is not None and batch.positions is not None:
                local = torch.from_numpy(rows)
                torch.index_select(self.ids[f], 0, local, out=batch.input_ids[start + lo : start + hi])
                torch.index_select(self.pos[f], 0, local, out=batch.positions[start + lo : start + hi])
            if batch.index is not None:  # a token's flat index in its file is (row, column)
                at = batch.index[start + lo : start + hi].numpy()
                at[:, 0] = self.file_ids[f]
                np.divmod(rows, self.seq[f], out=(at[:, 1], at[:, 2]))
        if defer is None:
            take_rows(takes, workers)
        else:
            defer += takes
        batch.filled += index.size


def take_rows(takes: list[Take], workers: Workers | None) -> None:
    """np.take of every (source rows, which, into), each split in equal parts over the workers and
    this thread. np.take: one thread per call, GIL released (index_select's OpenMP team contended
    with the reader threads and gathered at a third of the speed on 2 cores); mode="clip": "raise"
    buffers `out`."""
    parts = 1 if workers is None else GATHER_THREADS
    jobs = []
    for src, rows, out in takes:
        step = -(-rows.size // parts)
        jobs += [(src, rows[a : a + step], out[a : a + step]) for a in range(0, rows.size, step)]
    if workers is None or len(jobs) < 2:
        _take_group(jobs)
        return
    share = -(-len(jobs) // parts)
    groups = [jobs[i : i + share] for i in range(0, len(jobs), share)]
    futures = [workers.submit((0,), _take_group, g) for g in groups[1:]]
    _take_group(groups[0])
    for fut in futures:
        fut.result()


def _take_group(jobs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for src, rows, out in jobs:
        np.take(src, rows, axis=0, out=out, mode="clip")


def permutation(n: int, seed: int) -> np.ndarray:
    """range(n) permuted by `seed`, on this thread alone."""
    return np.random.Generator(PCG64(seed)).permutation(n)


def stratified(n: int, strata: int, seed: int) -> np.ndarray:
    """range(n) permuted by `seed` so that any `strata` consecutive entries come from distinct strata.

    The window's tokens (in storage order, where a document's tokens lie together) are cut in
    `strata` contiguous runs of q = n // strata tokens (at least 1); the permutation takes one
    random token of every stratum, in one random order of the strata, then another of each, and so
    on. A batch of up to `strata` tokens thus holds at most one token per q neighbours: no two of one
    document shorter than q, where a uniform permutation of the window puts a document's tokens
    together in a batch at the rate of the window's size (docs/benchmarks.md: TokenLoader: shuffle
    quality). Every token comes once; with n < 2 x strata this is a uniform permutation.
    """
    if n < 2:
        return np.arange(n)
    g = np.random.Generator(PCG64(seed))
    q = max(1, n // max(strata, 1))  # tokens per stratum
    m = -(-n // q)  # strata (the last may be short)
    # One random order within each stratum: argsort of random keys row by row (1.6 ms for 2**18
    # tokens in rows of 64; Generator.permuted along the rows took 17 ms). A short last stratum's
    # missing tokens get key 2.0, sort last, and are cut out below.
    keys = g.random((m, q), dtype=np.float32)
    keys[m - 1, n - (m - 1) * q :] = 2.0
    within = np.argsort(keys, axis=1)
    within += (g.permutation(m) * q)[:, None]  # [stratum in the rounds' order, k-th pick]
    out = within.T.reshape(-1)  # round by round: one token of each stratum
    return out if out.size == n else out[out < n]
