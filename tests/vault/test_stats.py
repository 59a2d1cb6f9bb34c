"""Exact mergeable statistics against numpy float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activault.vault.stats import RunningStats, merge_all


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


def test_statistics_keep_the_within_batch_variance():
    # Two batches with equal means: a running std that forgot the within-batch term would say 0.
    s = RunningStats(1)
    s.update(torch.tensor([[-1.0], [1.0]]))
    s.update(torch.tensor([[-1.0], [1.0]]))
    assert float(s.std[0]) == pytest.approx(1.0)
