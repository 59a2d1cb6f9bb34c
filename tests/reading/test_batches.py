"""reading/batches.py: TokenLoader's batches centred, scaled and cast from the statistics, each run's
tokens with its own parameters, and handed out as states or a dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from activault.reading.batches import Delivery
from activault.reading.buffers import ReadBuffers
from activault.reading.tokens import TokenLoader
from activault.reading.window import Batch
from support.synth import SynthRun


def test_normalisation_matches_statistics(run: SynthRun, tmp_path: Path) -> None:
    target = 8**0.5
    out = torch.cat(
        list(TokenLoader(tmp_path / "run/h2", batch_tokens=50, center=True, norm_target=target, drop_last=False))
    )
    assert out.dtype == torch.float32
    raw = run.tensor("h2").reshape(-1, 8)[run.tensor("h2", "positions").reshape(-1) >= 0].double()
    assert torch.allclose(out.double().mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-5)
    assert out.double().pow(2).sum(1).mean().sqrt().item() == pytest.approx(target, rel=1e-5)
    centred = raw - raw.mean(0)
    want = centred * (target / centred.pow(2).sum(1).mean().sqrt())
    assert torch.allclose(out.double().sort(0).values, want.sort(0).values, atol=1e-5)
    plain = torch.cat(list(TokenLoader(tmp_path / "run/h2", batch_tokens=50, norm_target=target, drop_last=False)))
    assert plain.double().norm(dim=1).mean().item() == pytest.approx(target, rel=1e-5)


def test_each_runs_tokens_are_normalised_with_their_own_parameters() -> None:
    # Two runs in one batch: rows 0..2 from run 0 (mean 1, scale 2), rows 3..4 from run 1 (no mean, scale 0.5).
    norm = [[(torch.ones(4), 2.0), (None, 0.5)]]
    out = Delivery(["h"], norm, None, torch.device("cpu"), 5, return_ids=True, return_index=False)
    buffers = ReadBuffers(False, keep=8)
    batch = out.empty([(4, torch.bfloat16)], buffers)
    batch.states[0].copy_(torch.arange(20, dtype=torch.bfloat16).view(5, 4))
    assert batch.input_ids is not None and batch.positions is not None
    batch.input_ids.copy_(torch.arange(5, dtype=torch.int32))
    batch.positions.fill_(3)
    batch.filled = 5
    got = out.deliver(batch, buffers, [(0, 3, 0), (3, 5, 1)])
    s = torch.arange(20, dtype=torch.float32).view(5, 4)
    want = torch.cat([(s[:3] - 1) * 2, s[3:] * 0.5])
    assert got["states"]["h"].dtype == torch.float32 and torch.equal(got["states"]["h"], want)
    assert got["input_ids"].dtype == torch.int64 and got["input_ids"].tolist() == [0, 1, 2, 3, 4]
    # Without parameters and dtype: the gathered states themselves, stored dtype, one hook unnamed.
    plain = Delivery(None, [[(None, 1.0)]], None, torch.device("cpu"), 2, return_ids=False, return_index=False)
    short = Batch([torch.ones(2, 4, dtype=torch.bfloat16)], None, None, filled=1)
    assert torch.equal(plain.deliver(short, buffers), torch.ones(1, 4, dtype=torch.bfloat16))
