"""TokenLoader's windows: the ramp's partition of an epoch's files and the shuffle-quality measure."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from activault.reading.window import (
    Draws,
    same_source_pairs,
    stratified,
    uniform_same_source_pairs,
    window_count,
    window_stages,
    window_start,
)


def test_windows_are_size_files_each_and_resume_where_they_begin() -> None:
    # What loaders cut since before the first-window ramp: states they saved resume exactly.
    for size in (1, 3, 4):
        plain = [(w, [f"f{i}" for i in range(w * size, min(w * size + size, 11))]) for w in range(-(-11 // size))]
        cut = [(w, items) for w, items, _ in window_stages(((i, f"f{i}") for i in range(11)), size, False)]
        assert cut == plain and window_count(11, size) == len(plain)
        assert [window_start(w, size) for w in range(5)] == [w * size for w in range(5)]
    assert window_count(0, 4) == 0 and window_count(3, 4) == 1 and window_count(4, 4) == 1 and window_count(5, 4) == 2


def test_same_source_pairs_counts_pairs_from_one_source() -> None:
    assert same_source_pairs(np.zeros(10, np.int64)) == 1.0  # one file: every pair
    assert same_source_pairs(np.arange(10)) == 0.0  # all different
    assert same_source_pairs(np.array([0, 0, 1, 1])) == pytest.approx(2 / 6)  # 2 of the 6 pairs
    assert same_source_pairs(np.array([3])) == 0.0
    # A uniform shuffle of 4 equal files: a pair is from one file a bit under 1/4 of the time.
    assert uniform_same_source_pairs(np.array([100] * 4)) == pytest.approx(4 * 100 * 99 / (400 * 399))
    rng = np.random.default_rng(0)
    draws = [same_source_pairs(rng.permutation(np.repeat(np.arange(4), 100))[:50]) for _ in range(200)]
    assert float(np.mean(draws)) == pytest.approx(uniform_same_source_pairs(np.array([100] * 4)), abs=0.02)


SIZES = [(0, 4), (1, 1), (7, 3), (100, 7), (1023, 256), (4096, 256), (5000, 4096), (9, 0)]


@pytest.mark.parametrize(("n", "strata"), SIZES)
def test_a_stratified_order_takes_each_of_any_strata_neighbours_from_another_stratum(n: int, strata: int) -> None:
    order = stratified(n, strata, seed=3)
    assert np.array_equal(np.sort(order), np.arange(n))  # every token once
    assert np.array_equal(order, stratified(n, strata, seed=3)) and (
        n < 4 or not np.array_equal(order, stratified(n, strata, seed=4))
    )
    q = max(1, n // max(strata, 1))  # tokens a stratum
    for a in range(n):  # any `strata` consecutive entries, however a batch is cut: distinct strata
        span = order[a : a + max(strata, 1)] // q
        assert np.unique(span).size == span.size


def test_a_window_drawn_as_its_files_arrive_draws_every_token_once() -> None:
    files = [(i, f"f{i}") for i in range(10)]
    # Progressive: window 0 handed over at each of its files, complete at its last; the others once.
    stages = [(w, list(items), complete) for w, items, complete in window_stages(files, 4, True)]
    assert stages[:4] == [
        (0, ["f0"], False),
        (0, ["f0", "f1"], False),
        (0, ["f0", "f1", "f2"], False),
        (0, ["f0", "f1", "f2", "f3"], True),
    ]
    assert stages[4:] == [(1, ["f4", "f5", "f6", "f7"], True), (2, ["f8", "f9"], True)]
    plain = [(0, ["f0", "f1", "f2", "f3"]), (1, ["f4", "f5", "f6", "f7"]), (2, ["f8", "f9"])]
    assert [(w, items) for w, items, _ in window_stages(files, 4, False)] == plain
    # Bad files skipped: a window ends where the next one's first file is (from tests of order.windows).
    skipped = [(i, f"f{i}") for i in (0, 1, 3, 4, 5, 8)]  # 2 and 6, 7 were bad files
    cut = [(w, list(items)) for w, items, _ in window_stages(skipped, 3, False)]
    assert cut == [(0, ["f0", "f1"]), (1, ["f3", "f4", "f5"]), (2, ["f8"])]
    assert list(window_stages([], 3, True)) == []
    seen: list[int] = []

    def arriving() -> Iterator[tuple[int, int]]:
        for i in range(4):
            seen.append(i)
            yield i, i

    # A window is handed over at its last file, before the next file is awaited.
    assert next(window_stages(arriving(), 2, False)) == (0, [0, 1], True) and seen == [0, 1]
    # Draws: 100 tokens a file, 4 files a window, 16-token batches: 25 tokens drawn at each of the
    # first three files (of those loaded and left), the rest at the last; each token once.
    draws, got = Draws(16, 4), []
    for k in range(4):
        got.append(draws.stage(100 * (k + 1), 100, k == 3, seed=k))
        assert got[-1].max() < 100 * (k + 1)  # only from the files loaded so far
    assert [g.size for g in got] == [25, 25, 25, 325]
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(400))
    # A window drawn in one stage is the stratified order itself (the state of an unramped loader).
    assert np.array_equal(Draws(16, 4).stage(400, 100, True, seed=9), stratified(400, 16, 9))
