"""tools/shuffle_plan.py: the plan of buckets (uniform, labels matching their counts) and the
permutation it makes uniform (positions and adjacent pairs over many seeds), padding last."""

from __future__ import annotations

import numpy as np

from activault.tools.shuffle_plan import bucket_counts, labels, permuted


def test_buckets_are_uniform_and_labels_match_their_counts() -> None:
    counts = bucket_counts([4000, 4000, 3], 4, seed=5)
    assert counts.sum(1).tolist() == [4000, 4000, 3]
    for j in range(3):
        assert np.bincount(labels(counts[j], j, 5), minlength=4).tolist() == counts[j].tolist()
    assert np.abs(counts[:2] / 1000 - 1).max() < 0.15  # each bucket about a quarter of a file
    # A slot's bucket, over many seeds, is uniform: each bucket about a quarter of the time.
    first = [labels(bucket_counts([3], 4, s)[0], 0, s)[0] for s in range(2000)]
    assert np.abs(np.bincount(first, minlength=4) / 500 - 1).max() < 0.15


def chi2(observed: np.ndarray) -> float:
    """Pearson's statistic of counts against equal expected counts."""
    expected = observed.sum() / observed.size
    return float(((observed - expected) ** 2 / expected).sum())


def test_the_permutation_is_uniform_over_seeds() -> None:
    """Every token lands at every position, and every ordered pair of tokens is adjacent, equally
    often over 6,000 seeds (a per-bucket or per-file bias, or an unpermuted bucket, fails this)."""
    slots, n, seeds = [4, 3, 3], 10, 6000
    where = np.zeros((n, n), dtype=np.int64)  # [token, position]
    pairs = np.zeros((n, n), dtype=np.int64)  # [token, token after it]
    for s in range(seeds):
        out = permuted(slots, 3, s)
        assert sorted(out.tolist()) == list(range(n))
        where[out, np.arange(n)] += 1
        pairs[out[:-1], out[1:]] += 1
    off = pairs[~np.eye(n, dtype=bool)]
    # chi-square with 99 and 89 degrees of freedom (sd ~14 and ~13): 6 sd above the mean never happens
    # by chance; a token kept in its file's bucket order gives thousands.
    assert chi2(where.ravel()) < 99 + 6 * 14
    assert chi2(off) < 89 + 6 * 13
    assert pairs.trace() == 0


def test_padding_ends_the_permutation_in_source_order() -> None:
    real = np.ones(10, dtype=bool)
    real[[3, 9]] = False
    out = permuted([4, 3, 3], 2, seed=1, real=real)
    assert out[-2:].tolist() == [3, 9] and sorted(out[:-2].tolist()) == [0, 1, 2, 4, 5, 6, 7, 8]
