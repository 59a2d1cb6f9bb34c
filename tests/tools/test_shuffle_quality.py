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
    # The window of 4 of 16 files: about 16 / 4 = 4x the ideal; the shuffled run: about 1x.
    assert before.ratio > 2.5 and after.ratio < 1.6
    # By file: one file's batches (the ramp's first) are all one source.
    by_file = shuffle_quality(TokenLoader(tmp_path / "run/h1", **opts), batches=2, by="file")
    assert by_file.rate == 1.0 and by_file.ideal == pytest.approx(1 / 16, rel=0.05)
    with pytest.raises(ConfigError, match="return_ids=True"):
        shuffle_quality(TokenLoader(tmp_path / "run/h1", batch_tokens=64), batches=1)
