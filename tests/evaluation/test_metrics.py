"""evaluation/metrics.py: the running sums give what float64 numpy gives over all tokens at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activault.evaluation.metrics import ReconstructionMeter, density_bins


def test_batches_give_the_float64_measures_of_all_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen) * 3 + 5  # a large mean: FVU is around the mean, not 0
    latents = torch.relu(torch.randn(300, 32, generator=gen) - 1)
    latents[:, :4] = 0  # 4 dead latents
    x_hat = x + 0.5 * torch.randn(300, 8, generator=gen)
    meter = ReconstructionMeter()
    for i in range(0, 300, 70):
        meter.add(x[i : i + 70], latents[i : i + 70], x_hat[i : i + 70])
    r = meter.result()
    xn, hn, ln = x.double().numpy(), x_hat.double().numpy(), latents.numpy()
    fvu = ((xn - hn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert r.tokens == 300 and r.explained_variance == pytest.approx(1 - fvu, rel=1e-12)
    assert r.mse == pytest.approx(((xn - hn) ** 2).mean(), rel=1e-12)
    assert r.l0 == pytest.approx((ln != 0).sum(1).mean(), rel=1e-12)
    freq = (ln != 0).mean(0)
    assert r.dead == 4 and r.d_sae == 32 and r.density_median == pytest.approx(np.sort(freq)[15])  # the lower middle
    assert sum(r.density.values()) == 32 and r.density["0"] == 4  # each latent in one bin


def test_density_bins() -> None:
    bins = density_bins(torch.tensor([0.0, 0.0, 5e-7, 1e-5, 0.05, 0.1, 1.0], dtype=torch.float64))
    assert bins == {
        "0": 2,
        "<1e-06": 1,
        "1e-06..1e-05": 0,
        "1e-05..0.0001": 1,
        "0.0001..0.001": 0,
        "0.001..0.01": 0,
        "0.01..0.1": 1,
        ">=0.1": 2,
    }


def test_no_tokens_and_mismatched_shapes_are_errors() -> None:
    meter = ReconstructionMeter()
    with pytest.raises(ValueError, match="no tokens"):
        meter.result()
    with pytest.raises(ValueError, match="shapes"):
        meter.add(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 2))
