"""Exact mergeable statistics against numpy float64."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from activault.errors import DataError
from activault.storage import LocalStore
from activault.vault.records import read_statistics
from activault.vault.stats import (
    NORM_BINS_PER_OCTAVE,
    STATS_VERSION,
    RunningStats,
    bin_value,
    check_histogram,
    check_normalisable,
    finite_rows,
    merge_all,
    norm_bins,
)
from support.synth import SynthRun, write_synthetic_run


def test_statistics_merge_in_any_split_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(5000, 16)) * rng.uniform(0.1, 10, size=16)
    cuts = sorted(rng.choice(np.arange(1, 5000), size=9, replace=False))
    parts = []
    for a, b in zip([0, *cuts], [*cuts, 5000], strict=True):
        s = RunningStats(16)
        for chunk in np.array_split(x[a:b], 3):
            s.update(torch.from_numpy(chunk))
        parts.append(RunningStats.from_dict(json.loads(json.dumps(s.to_dict()))))  # through JSON, as on disk
    total = merge_all(parts)
    assert total is not None and total.count == 5000
    np.testing.assert_allclose(total.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.std.numpy(), x.std(0), rtol=1e-10)
    np.testing.assert_allclose(total.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_statistics_of_one_batch_equal_numpy_float64_to_the_bit(dtype: torch.dtype) -> None:
    # The CPU path is numpy's own float64 passes: a batch's mean and variance are numpy's, bit for bit.
    x = (torch.randn(2048, 96, generator=torch.Generator().manual_seed(0)) * 3 + 0.5).to(dtype)
    x64 = x.to(torch.float64).numpy()
    s = RunningStats(96)
    s.update(x)
    np.testing.assert_array_equal(s.mean.numpy(), x64.mean(0))
    np.testing.assert_array_equal(s.var.numpy(), x64.var(0))
    np.testing.assert_allclose(s.mean_norm, np.linalg.norm(x64, axis=1).mean(), rtol=1e-14)


def test_cpu_statistics_equal_the_device_path_with_nan_and_inf_tokens() -> None:
    # The GPU's torch path, run on CPU tensors: the same counts and histogram, the same sums to 1e-14.
    x = torch.randn(700, 24, generator=torch.Generator().manual_seed(2)) * 5
    x[3, 1], x[400, 0], x[699, 5] = float("nan"), float("inf"), -float("inf")
    cpu, device = RunningStats(24), RunningStats(24)
    for part in x.split(250):
        cpu.update(part)
        device._update_device(part)
    assert (cpu.count, cpu.nonfinite_tokens) == (device.count, device.nonfinite_tokens) == (697, 3)
    assert cpu.norm_hist is not None and device.norm_hist is not None
    assert torch.equal(cpu.norm_hist, device.norm_hist)
    for a, b in [(cpu.mean, device.mean), (cpu.m2, device.m2), (cpu.norm_sum, device.norm_sum)]:
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_statistics_keep_the_within_batch_variance():
    # Two batches with equal means: a running std that forgot the within-batch term would say 0.
    s = RunningStats(1)
    s.update(torch.tensor([[-1.0], [1.0]]))
    s.update(torch.tensor([[-1.0], [1.0]]))
    assert float(s.std[0]) == pytest.approx(1.0)


def test_statistics_leave_out_tokens_with_nan_or_inf_and_count_them():
    # Tokens with a NaN or an Inf anywhere, in any split: the merge equals numpy float64 over the rest.
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 3.0, size=(3000, 8))
    bad = [5, 6, 1000, 2999]
    x[5, 3], x[6, 0], x[1000, 7], x[2999, :] = np.nan, np.inf, -np.inf, np.nan
    ok = np.ones(3000, bool)
    ok[bad] = False
    parts = []
    for a, b in [(0, 6), (6, 7), (7, 2000), (2000, 3000)]:  # one part is a single bad token
        s = RunningStats(8)
        for chunk in np.array_split(x[a:b], 2):
            s.update(torch.from_numpy(chunk).float())
        parts.append(RunningStats.from_dict(json.loads(json.dumps(s.to_dict()))))
    total = merge_all(parts)
    assert total is not None and total.finite
    finite = x[ok].astype(np.float32).astype(np.float64)  # what float32 tokens hold
    assert total.count == ok.sum() and total.nonfinite_tokens == len(bad)
    np.testing.assert_allclose(total.mean.numpy(), finite.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.std.numpy(), finite.std(0), rtol=1e-10)
    np.testing.assert_allclose(total.mean_norm, np.linalg.norm(finite, axis=1).mean(), rtol=1e-12)
    np.testing.assert_allclose(float(total.norm_sq_sum), (finite**2).sum(), rtol=1e-12)
    d = total.to_dict()
    assert d["stats_version"] == STATS_VERSION == 3 and d["count"] == ok.sum() and d["nonfinite"] == len(bad)
    assert sum(d["norm_hist"]) == ok.sum()  # the bad tokens are in no norm bin
    assert all(np.isfinite(d[k]).all() for k in ("mean", "std", "m2", "norm", "norm_sum", "norm_sq_sum"))


def test_statistics_of_only_bad_tokens_count_none():
    s = RunningStats(2)
    s.update(torch.full((3, 2), float("nan")))
    assert (s.count, s.nonfinite_tokens, s.finite) == (0, 3, True)
    assert s.to_dict()["mean"] == [0.0, 0.0]


def test_version_1_statistics_with_nan_are_refused_for_normalising():
    # Written before tokens with NaN were left out: they counted in, the statistics are NaN.
    s = RunningStats(2)
    s.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    old = {**s.to_dict(), "stats_version": 1, "count": 3, "nonfinite": 1, "norm_sum": math.nan}
    old["mean"] = [math.nan, 3.0]
    stale = RunningStats.from_dict(json.loads(json.dumps(old)))
    assert not stale.finite and stale.to_dict()["stats_version"] == 1
    merged = RunningStats(2).merge(s).merge(stale)
    assert not merged.finite and merged.to_dict()["stats_version"] == 1  # NaN stays NaN, and says so
    with pytest.raises(DataError) as e:
        check_normalisable(merged, "s3://bucket/runs/my-run/layer.6")
    msg = str(e.value)
    for part in ("hook 'layer.6'", "run s3://bucket/runs/my-run", "1 token(s) with NaN or Inf", "merge-stats RUN"):
        assert part in msg, msg
    assert "drop_nonfinite=True" in msg
    assert check_normalisable(s, "x/run/h") is s


def test_finite_rows_read_the_exponent_bits_of_every_float_dtype():
    x = torch.randn(7, 5, dtype=torch.float64) * 1e3
    x[1, 2], x[3, 0], x[6, 4] = math.nan, math.inf, -math.inf
    want = torch.isfinite(x).all(1).numpy()
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        assert (finite_rows(x.to(dtype)) == want).all(), dtype
    big = torch.full((3, 2), 65504.0, dtype=torch.float16)  # float16's largest finite value
    assert finite_rows(big).all()


# ---- a run's statistics.json ----

# One token of h1 holds NaN (machine 1's first file, row 2, seq 5), one of h2 +Inf (machine 0).
POISON = [("h1", 3, 2, 5, math.nan), ("h2", 1, 0, 0, math.inf)]


def finite_tokens(run: SynthRun, hook: str) -> np.ndarray:
    """The stored non-padding tokens of `hook` without NaN or Inf, float64 `[tokens, d]`."""
    x = run.tensor(hook).reshape(-1, 8)[run.tensor(hook, "positions").reshape(-1) >= 0].double()
    return x[torch.isfinite(x).all(1)].numpy()


def test_a_run_with_one_bad_token_has_the_statistics_of_the_others(local: LocalStore) -> None:
    run = write_synthetic_run(local, "run", ["h1", "h2"], machines=2, files=3, nonfinite=POISON)
    for h in run.hooks:
        got = read_statistics(local, f"run/{h}")
        assert got is not None and got.stats_version == STATS_VERSION and got.machines == [0, 1]
        want = finite_tokens(run, h)
        kept = int((run.tensor(h, "positions") >= 0).sum())
        assert (got.count, got.nonfinite) == (kept - 1, 1) == (len(want), 1)
        np.testing.assert_allclose(got.mean, want.mean(0), rtol=1e-12)
        np.testing.assert_allclose(got.std, want.std(0), rtol=1e-10)
        np.testing.assert_allclose(got.norm, np.linalg.norm(want, axis=1).mean(), rtol=1e-12)
        np.testing.assert_allclose(got.norm_sq_sum, (want**2).sum(), rtol=1e-12)


def test_norm_histogram_of_two_machines_equals_one_machine_and_gives_the_median_within_a_bin():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4001, 32, generator=g) * torch.exp(torch.randn(4001, 1, generator=g))  # norms over decades
    x[:5] *= 1e-9  # under the histogram's range
    x[5:8] *= 1e9  # over it
    one = RunningStats(32)
    one.update(x)
    machines = [RunningStats(32), RunningStats(32)]
    for i, chunk in enumerate(torch.split(x, [1500, 1000, 1501])):
        machines[i % 2].update(chunk)
    parts = [RunningStats.from_dict(json.loads(json.dumps(m.to_dict()))) for m in machines]  # as stored
    total = merge_all(parts)
    assert total is not None and one.norm_hist is not None and total.norm_hist is not None
    assert torch.equal(total.norm_hist, one.norm_hist) and int(one.norm_hist.sum()) == 4001
    assert int(one.norm_hist[0]) == 5 and int(one.norm_hist[-1]) == 3
    norms = torch.linalg.vector_norm(x.double(), dim=1)
    exact = float(norms.median())  # the lower median, as quantile's rank
    assert abs(math.log2(total.median_norm() / exact)) <= 1 / NORM_BINS_PER_OCTAVE
    for q in (0.1, 0.9):
        rank = math.ceil(q * 4001)
        exact_q = float(norms.sort().values[rank - 1])
        assert abs(math.log2(total.quantile(q) / exact_q)) <= 1 / NORM_BINS_PER_OCTAVE
    assert total.quantile(0.0) == bin_value(0) and total.quantile(1.0) == bin_value(int(norm_bins(norms.max().view(1))))


def test_statistics_without_a_histogram_stay_without_one_and_say_so():
    s = RunningStats(4)
    s.update(torch.ones(10, 4))
    old = s.to_dict()
    del old["norm_hist"]
    old["stats_version"] = 2
    merged = RunningStats(4).merge(RunningStats.from_dict(old)).merge(s)  # a version 2 machine in the merge
    merged.update(torch.ones(3, 4))
    assert merged.norm_hist is None and merged.to_dict()["stats_version"] == 2 and "norm_hist" not in merged.to_dict()
    with pytest.raises(DataError, match="hook 'h' of run /v/r have no norm histogram .stats_version 2.*merge-stats"):
        check_histogram(merged, "/v/r/h")
    with pytest.raises(DataError, match="no norm histogram"):
        merged.median_norm()
    assert check_histogram(s, "/v/r/h") is s and s.median_norm() == pytest.approx(2.0, rel=0.012)
