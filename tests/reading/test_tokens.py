"""TokenLoader and ActivationDataset against synthetic runs in a local folder."""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rcache import rows, tokens, triples
from torch.utils.data import DataLoader

from activault.errors import ConfigError
from activault.reading.tokens import ActivationDataset, TokenLoader
from support.synth import SynthRun


@pytest.mark.parametrize("stop_after", [1, 5, 9])
def test_resume_token_loader(run: SynthRun, tmp_path: Path, stop_after: int) -> None:
    # 20-token batches straddle windows of 2 files (128 tokens minus padding): resumes land mid-window.
    opts = dict(batch_tokens=20, window=2, return_ids=True, seed=7, drop_positions_below=1)
    full = list(TokenLoader(tmp_path / "run/h1", **opts))
    loader = TokenLoader(tmp_path / "run/h1", **opts)
    with loader:
        for k, _ in enumerate(loader):
            if k + 1 == stop_after:
                break
        state = loader.state_dict()
    again = TokenLoader(tmp_path / "run/h1", **opts)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(full) - stop_after
    for x, y in zip(rest, full[stop_after:], strict=True):
        assert torch.equal(x["states"], y["states"]) and torch.equal(x["input_ids"], y["input_ids"])


def test_token_loader_covers_kept_tokens(run: SynthRun, tmp_path: Path) -> None:
    out = list(
        TokenLoader(
            tmp_path / "run/h1", batch_tokens=32, window=3, return_ids=True, drop_last=False, drop_positions_below=2
        )
    )
    assert all(b["states"].shape == (32, 8) for b in out[:-1])
    s, i, p = (torch.cat([b[k] for b in out]) for k in ("states", "input_ids", "positions"))
    assert p.min() >= 2
    want = tokens(run, "h1")
    assert triples(s, i, p) == Counter(
        {k: v for k, v in want.items() if int.from_bytes(k[-4:], "little", signed=True) >= 2}
    )
    full = list(TokenLoader(tmp_path / "run/h1", batch_tokens=32, window=3, drop_positions_below=2))
    assert len(full) == len(out) - 1  # drop_last


def test_dataloader_workers(run: SynthRun, tmp_path: Path) -> None:
    ds = ActivationDataset(str(tmp_path / "run/h1"))
    got = sum((rows(b) for b in DataLoader(ds, batch_size=None, num_workers=2)), Counter())
    assert got == rows(run.tensor("h1"))
    ds = ActivationDataset(str(tmp_path / "run/h1"), batch_tokens=24, drop_last=False, return_ids=True)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    got = sum((triples(b["states"], b["input_ids"], b["positions"]) for b in batches), Counter())
    assert got == tokens(run, "h1")


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


def flat_tokens(batches: list[dict[str, torch.Tensor]]) -> list[bytes]:
    """Each token of the batches as bytes (state, id, position), in stream order."""
    s, i, p = (torch.cat([b[k] for b in batches]) for k in ("states", "input_ids", "positions"))
    both = torch.cat([s.view(torch.uint8), i.view(-1, 1).view(torch.uint8), p.view(-1, 1).view(torch.uint8)], 1)
    return [bytes(r.numpy()) for r in both]


def test_loop_runs_epochs_back_to_back_and_resumes_exactly(run: SynthRun, tmp_path: Path) -> None:
    opts = dict(window=2, return_ids=True, seed=3, drop_positions_below=1)
    # One token per batch: the stream in its shuffled order (larger batches sort their tokens).
    one = TokenLoader(tmp_path / "run/h1", batch_tokens=1, **opts)
    epochs = [flat_tokens(list(one)) for _ in range(3)]  # each epoch in its own order
    assert len({tuple(e) for e in epochs}) == 3 and all(Counter(e) == Counter(epochs[0]) for e in epochs)
    per_epoch = len(epochs[0])
    assert per_epoch % 20 != 0  # so batches straddle epoch boundaries
    n = 3 * per_epoch // 20
    looped = TokenLoader(tmp_path / "run/h1", batch_tokens=20, loop=True, **opts)
    stream = list(islice(looped, n))
    looped.finalize()
    assert all(b["states"].shape == (20, 8) for b in stream)
    order = sum(epochs, [])
    for k, b in enumerate(stream):
        assert Counter(flat_tokens([b])) == Counter(order[20 * k : 20 * k + 20])
    opts["batch_tokens"] = 20
    # Resumed at every batch around the first epoch boundary: the same continuation.
    for k in range(per_epoch // 20 - 1, per_epoch // 20 + 2):
        first = TokenLoader(tmp_path / "run/h1", loop=True, **opts)
        for _ in islice(first, k):
            pass
        state = first.state_dict()
        first.finalize()
        again = TokenLoader(tmp_path / "run/h1", loop=True, **opts)
        again.load_state_dict(state)
        rest = list(islice(again, 4))
        again.finalize()
        assert flat_tokens(rest) == flat_tokens(stream[k : k + 4])


def test_loop_without_tokens_is_an_error(run: SynthRun, tmp_path: Path) -> None:
    # 6 files, 8 ranks: rank 7 reads none, and an endless loop over nothing would hang.
    loader = TokenLoader(tmp_path / "run/h1", batch_tokens=8, rank=7, world_size=8, loop=True)
    with pytest.raises(ConfigError, match="holds no tokens"):
        next(iter(loader))


def test_dropped_tail_is_counted_and_logged(run: SynthRun, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kept = sum(tokens(run, "h1").values())
    with caplog.at_level(logging.INFO, logger="activault.reading.tokens"):
        loader = TokenLoader(tmp_path / "run/h1", batch_tokens=32, window=3)
        batches = list(loader)
    assert loader.dropped_tokens == kept - 32 * len(batches) > 0
    assert f"dropped the last {loader.dropped_tokens} tokens" in caplog.text
    tail = list(TokenLoader(tmp_path / "run/h1", batch_tokens=32, window=3, drop_last=False))
    assert len(tail) == len(batches) + 1 and tail[-1].shape == (loader.dropped_tokens, 8)


def test_batches_do_not_depend_on_the_gather_threads(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from activault.reading import tokens as tokens_module

    opts = dict(batch_tokens=40, window=3, return_ids=True, seed=3, drop_last=False)
    got = {}
    for threads in (1, 2, 4):
        monkeypatch.setattr(tokens_module, "GATHER_THREADS", threads)
        got[threads] = list(TokenLoader(tmp_path / "run/h1", **opts))
    for threads in (2, 4):
        assert len(got[threads]) == len(got[1])
        for x, y in zip(got[threads], got[1], strict=True):
            assert all(torch.equal(x[k], y[k]) for k in ("states", "input_ids", "positions"))


def test_a_state_from_another_shuffle_or_of_another_shape_is_refused_by_name(run: SynthRun, tmp_path: Path) -> None:
    opts = dict(batch_tokens=20, window=2, seed=7)
    first = TokenLoader(tmp_path / "run/h1", **opts)
    with first:
        for k, _ in enumerate(first):
            if k == 2:
                break
        mid = first.state_dict()
    assert mid["offset"] > 0 and mid["shuffle"] == "numpy-pcg64"
    old = {k: v for k, v in mid.items() if k != "shuffle"}  # saved by a loader that used torch.randperm
    with pytest.raises(ConfigError, match="shuffled with 'torch-randperm'.*window boundary \\(offset 0\\)"):
        TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(old)
    # At a window boundary no token of the window was taken yet: resumed exactly.
    boundary = {**old, "window": np.int64(1), "offset": 0}  # numpy integers as well
    again = TokenLoader(tmp_path / "run/h1", **opts)
    again.load_state_dict(boundary)
    fresh = TokenLoader(tmp_path / "run/h1", **opts)
    fresh.load_state_dict({**mid, "window": 1, "offset": 0})
    assert torch.equal(torch.cat(list(again)), torch.cat(list(fresh)))
    for bad, match in (
        ({}, "not a TokenLoader state_dict: no epoch, window, offset"),
        ([1, 2], "not a TokenLoader state_dict"),
        ({**mid, "offset": -1}, "whole numbers >= 0"),
        ({**mid, "window": "1"}, "whole numbers >= 0"),
        ({**mid, "epoch": True}, "whole numbers >= 0"),
        ({**mid, "seed": 8}, "saved with seed=8, this loader has 7"),
    ):
        with pytest.raises(ConfigError, match=match):
            TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(bad)  # type: ignore[arg-type]
