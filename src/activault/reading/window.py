"""TokenLoader's shuffle window: which files form window w (a ramp from one file up), its tokens
indexed without copying them together, the permutation, and the one gather into a batch.

The partition into windows is a pure function of (file index, window size, ramp): a resumed
loader cuts the same windows as an uninterrupted one. `same_source_pairs` is the shuffle-quality
measure the ramp is reported with (docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from numpy.random import PCG64

from activault.reading.fetch import Workers
from activault.reading.filters import FILTERS, FilteredFile

T = TypeVar("T")

# How a window is shuffled: state_dict() records it, as a resume mid-window needs the same order.
# numpy's PCG64, not torch.randperm: randperm fills its range with an OpenMP team whose idle thread
# then spins for milliseconds on a core the gather needs. State dicts without the key were saved
# by loaders that used torch.randperm.
SHUFFLE = "numpy-pcg64"

# Threads that gather a batch (with the consumer's own): one thread copies rows at about half the
# rate two cores read files from the page cache.
GATHER_THREADS = max(1, min(4, os.cpu_count() or 1))


# -- which files form a window ---------------------------------------------------------------------


def ramp_length(size: int, ramp: bool) -> int:
    """Windows of the ramp (1, 2, 4, ... files, each under `size`) before the full ones; 0 without."""
    return (size - 1).bit_length() if ramp else 0


def window_start(w: int, size: int, ramp: bool) -> int:
    """The index of window `w`'s first file in the epoch's order (where a resumed loader starts).

    With `ramp`, window w < R holds 2**w files (R = ramp_length), so the first batch needs one
    file; the ramp's windows hold 2**R - 1 files together, and `size` files each follow.
    """
    r = ramp_length(size, ramp)
    return 2**w - 1 if w < r else 2**r - 1 + (w - r) * size


def window_of(index: int, size: int, ramp: bool) -> int:
    """The window that file `index` (in the epoch's order) belongs to."""
    r = ramp_length(size, ramp)
    if index < 2**r - 1:
        return (index + 1).bit_length() - 1
    return r + (index - (2**r - 1)) // size


def window_count(files: int, size: int, ramp: bool) -> int:
    """Windows of an epoch of `files` files (the last may be short)."""
    return 0 if files <= 0 else window_of(files - 1, size, ramp) + 1


def ramp_windows(files: Iterable[tuple[int, T]], size: int, ramp: bool) -> Iterator[tuple[int, list[T]]]:
    """(window index, its items) of (file index, item) pairs in order.

    A window is handed over at its last file (not once the next one arrives); one whose last
    files are missing (skipped as bad, or the epoch's end) ends where the next window's file is.
    """
    items: list[T] = []
    w = -1
    for index, item in files:
        if items and window_of(index, size, ramp) != w:  # the window's last file was skipped as bad
            yield w, items
            items = []
        w = window_of(index, size, ramp)
        items.append(item)
        del item
        if index + 1 == window_start(w + 1, size, ramp):
            yield w, items
            items = []  # dropped before the next file is awaited
    if items:
        yield w, items


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

    def gather(self, index: np.ndarray, batch: Batch, workers: Workers | None = None) -> None:
        """Append tokens `index` to the batch: one copy, file by file (in storage order), split
        over `workers` (and this thread) when given."""
        index = np.sort(index)  # 15 us for 4,096 indices; torch.sort took 130 us (a 2.5 ms batch here)
        bounds = np.searchsorted(index, self.offsets).tolist()
        start = batch.filled
        takes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows of, which, into)
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
        take_rows(takes, workers)
        batch.filled += index.size


def take_rows(takes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], workers: Workers | None) -> None:
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
