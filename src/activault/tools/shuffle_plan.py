"""The order `activault shuffle` writes, as pure functions of the seed and the source files'
sizes (no I/O): each slot's bucket (a multinomial draw per file, then its arrangement), the
temporary run's pieces, and the whole permutation (`permuted`, what tests and reasoning check)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from activault.reading.order import mix_seed
from activault.reading.window import permutation


def _rng(seed: int, *parts: int | str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(mix_seed(seed, "shuffle", *parts)))


def bucket_counts(slots: Sequence[int], buckets: int, seed: int) -> np.ndarray:
    """[files, buckets]: how many of each file's slots go to each bucket (a multinomial draw)."""
    p = np.full(buckets, 1.0 / buckets)
    return np.stack([_rng(seed, "file", j).multinomial(c, p) for j, c in enumerate(slots)])


def labels(count: np.ndarray, j: int, seed: int) -> np.ndarray:
    """Each slot's bucket in file j: the counts (first draw) arranged uniformly (second draw)."""
    g = _rng(seed, "file", j)
    g.multinomial(int(count.sum()), np.full(count.size, 1.0 / count.size))  # the counts' draw
    return g.permutation(np.repeat(np.arange(count.size), count))


def piece_index(counts: np.ndarray) -> np.ndarray:
    """[files, buckets]: the temporary run's file index of each non-empty piece (-1: empty). Bucket
    0 has none: pass 1 keeps it in memory (no temporary bytes for it; a single bucket is one pass)."""
    present = counts > 0
    present[:, 0] = False
    return np.where(present, np.cumsum(present.ravel()).reshape(counts.shape) - 1, -1)


def permuted(slots: Sequence[int], buckets: int, seed: int, real: np.ndarray | None = None) -> np.ndarray:
    """The permutation the two passes write, as a pure function (for tests and reasoning): the
    source slot (index over the files in order) each of DST's slots holds. `real`: a bool per
    source slot, False for padding (then last, in source order)."""
    counts = bucket_counts(slots, buckets, seed)
    bucket = np.concatenate([labels(counts[j], j, seed) for j in range(len(slots))])
    out = []
    for b in range(buckets):
        members = np.flatnonzero(bucket == b)  # in source order, as the pieces fill the bucket
        if real is not None:
            members = members[real[members]]
        out.append(members[permutation(members.size, mix_seed(seed, "shuffle", "bucket", b))])
    if real is not None:
        out.append(np.flatnonzero(~real))
    return np.concatenate(out)
