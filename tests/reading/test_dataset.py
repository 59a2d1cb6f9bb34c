"""ActivationDataset: RCache megabatches and TokenLoader batches through DataLoader workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from test_rcache import rows, tokens, triples
from torch.utils.data import DataLoader

from activault.reading.dataset import ActivationDataset
from support.synth import SynthRun


def test_dataloader_workers(run: SynthRun, tmp_path: Path) -> None:
    ds = ActivationDataset(str(tmp_path / "run/h1"))
    got = sum((rows(b) for b in DataLoader(ds, batch_size=None, num_workers=2)), Counter())
    assert got == rows(run.tensor("h1"))
    ds = ActivationDataset(str(tmp_path / "run/h1"), batch_tokens=24, drop_last=False, return_ids=True)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    got = sum((triples(b["states"], b["input_ids"], b["positions"]) for b in batches), Counter())
    assert got == tokens(run, "h1")
