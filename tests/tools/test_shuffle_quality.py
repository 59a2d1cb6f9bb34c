"""tools/shuffle_quality.py: the same-document pair rate of a reader's batches against an ideal shuffle's,
before and after `activault shuffle`."""

from __future__ import annotations

from pathlib import Path

import pytest

from activault.errors import ConfigError
from activault.reading.tokens import TokenLoader
from activault.storage import LocalStore
from activault.tools.shuffle import shuffle_run
from activault.tools.shuffle_quality import shuffle_quality
from support.synth import write_synthetic_run

HOOKS = ["h1", "h2"]


def test_shuffle_quality_before_and_after_the_shuffle(tmp_path: Path) -> None:
    local = LocalStore(tmp_path, fsync=False)
    write_synthetic_run(local, "run", HOOKS, machines=2, files=8, rows=8)
    shuffle_run(local, "run", local, "dst", seed=0, buckets=4)
    opts = dict(batch_tokens=64, return_ids=True, seed=0)
    before = shuffle_quality(TokenLoader(tmp_path / "run/h1", **opts), batches=30)
    after = shuffle_quality(TokenLoader(tmp_path / "dst/h1", **opts), batches=30, reference=tmp_path / "run/h1")
    assert before.by == "document" and before.unmatched == after.unmatched == 0
    assert before.ideal == after.ideal > 0 and before.tokens == 30 * 64
    # The window of 4 of 16 files: a uniform shuffle of the window would score about 16 / 4 = 4x the
    # ideal; its stratified order does better, the shuffled run about 1x.
    assert 1.0 < before.ratio < 4.0 and after.ratio < 1.6
    # By file: the first batch (the first file's share of the first window) is all one source.
    by_file = shuffle_quality(TokenLoader(tmp_path / "run/h1", **opts), batches=1, by="file")
    assert by_file.rate == 1.0 and by_file.ideal == pytest.approx(1 / 16, rel=0.05)
    with pytest.raises(ConfigError, match="return_ids=True"):
        shuffle_quality(TokenLoader(tmp_path / "run/h1", batch_tokens=64), batches=1)


def test_the_default_loader_is_within_2x_of_an_ideal_shuffle(tmp_path: Path) -> None:
    # 16 files of 1,024 tokens, documents of ~7 tokens, 256-token batches over the whole epoch: a
    # uniform shuffle of each window of 4 files scored 5.6x the ideal same-document rate with the
    # ramp that cut windows of 1, 2, 4 files (docs/benchmarks.md); the stratified order with the
    # first window drawn as its files arrive scores under 2x, at the same memory.
    local = LocalStore(tmp_path, fsync=False)
    write_synthetic_run(local, "run", ["h1"], machines=2, files=8, rows=64, seq=16)
    opts = dict(batch_tokens=256, return_ids=True, seed=0)
    default = shuffle_quality(TokenLoader(tmp_path / "run/h1", **opts), batches=10**6)
    assert default.batches == 63 and default.unmatched == 0 and default.ratio <= 2.0
    # The knob: a larger window (more memory) mixes more documents into each batch.
    wider = shuffle_quality(TokenLoader(tmp_path / "run/h1", window=8, **opts), batches=10**6)
    assert wider.ratio < default.ratio


def test_a_mixture_is_within_2x_of_an_ideal_shuffle(tmp_path: Path) -> None:
    # Two runs as above, mixed 1:1 in 256-token batches: each run's windows stratified with the
    # first drawn as its files arrive, as a lone loader's (their uniform shuffle and the ramp of 1,
    # 2, 4 files scored 6x the ideal here).
    local = LocalStore(tmp_path, fsync=False)
    for name, seed in (("a", 1), ("b", 2)):
        write_synthetic_run(local, name, ["h1"], machines=2, files=8, rows=64, seq=16, seed=seed)
    runs = [tmp_path / "a/h1", tmp_path / "b/h1"]
    opts = dict(batch_tokens=256, return_ids=True, seed=0)
    mixed = shuffle_quality(TokenLoader(runs, weights=[1, 1], **opts), batches=10**6)
    assert mixed.batches == 128 and mixed.unmatched == 0 and mixed.ratio <= 2.0
    # The ideal: a uniform shuffle of each run at the batch's share of it (128 tokens of each here).
    alone = [shuffle_quality(TokenLoader(r, **opts), batches=1).ideal for r in runs]
    assert mixed.ideal == pytest.approx(128 * 127 * sum(alone) / (256 * 255))
    unequal = shuffle_quality(TokenLoader(runs, weights=[0.7, 0.3], **opts), batches=10**6)
    assert unequal.unmatched == 0 and unequal.ratio <= 2.0
    # A mixture's reference: one per run, in the order of weights.
    again = shuffle_quality(TokenLoader(runs, weights=[1, 1], **opts), batches=5, reference=runs)
    assert again.rate == shuffle_quality(TokenLoader(runs, weights=[1, 1], **opts), batches=5).rate
    with pytest.raises(ConfigError, match="a mixture of 2 runs needs a list of 2 references, one per run"):
        shuffle_quality(TokenLoader(runs, weights=[1, 1], **opts), batches=1, reference=runs[0])
