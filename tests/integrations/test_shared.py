"""integrations/shared.py: each integration's loader options checked once (a typo named with what is
accepted, ReadOptions passed through), and a run's exact statistics, a missing or damaged record named
with its repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.integrations import shared as v
from activault.integrations.dictionary_learning import VaultBuffer
from activault.integrations.saelens import VaultProvider
from activault.integrations.sparsify import replay
from activault.storage import LocalStore
from support.synth import SynthRun


def test_options_are_checked_once_and_travel_as_one_value(run: SynthRun, tmp_path: Path) -> None:
    """Each integration checks its loader's options when it is made: a mistyped one is named with what
    it accepts (the integration's own arguments and TokenLoader's); `options=ReadOptions(...)` passes
    through, its rank and world_size too unless the integration is given its own."""
    root = tmp_path / "run"
    for make, owner, typo in (
        (lambda: VaultProvider(root, "h1", batch_tokens=8, windw=2), "VaultProvider", "window"),
        (lambda: VaultProvider(root, "h1", batch_tokens=8, loop=False), "VaultProvider", "None"),
        (lambda: VaultBuffer(root, "h1", out_batch_size=8, bufer_size=3), "VaultBuffer", "buffer_size"),
        (lambda: replay(root, ["h1"], num_tokens=64, tokens_per_row=8, sed=1), "replay", "seed"),
    ):
        with pytest.raises(ConfigError, match=f"^{owner} has no option") as e:
            make()
        assert (f"did you mean {typo!r}" in str(e.value)) == (typo != "None")
        assert "drop_positions_below" in str(e.value) and "verify_checksums" in str(e.value)
    for make, message in (
        (lambda: VaultBuffer(root, "h1", out_batch_size=0), "out_batch_size=0 is not accepted"),
        (lambda: replay(root, ["h1"], num_tokens=64, tokens_per_row=2.5), "tokens_per_row=2.5 is not accepted"),
        (lambda: replay(root, ["h1"], num_tokens=4, tokens_per_row=8), "num_tokens=4 is not accepted"),
        (lambda: VaultProvider(root, "h1", batch_tokens=8, buffer_size=0), "buffer_size=0 is not accepted"),
        (lambda: VaultProvider(root, "h1", batch_tokens=8, store_options={"fsnyc": 1}), "'fsnyc'"),
    ):
        with pytest.raises(ConfigError, match=message):
            make()
    shard = v.ReadOptions(rank=1, world_size=2, seed=3, buffer_size=1)
    with VaultProvider(root, "h1", batch_tokens=8, options=shard) as p:
        assert (p.rank, p.world_size, p.loader.rank, p.loader.seed, p.loader.files.buffer_size) == (1, 2, 1, 3, 1)
    with VaultProvider(root, "h1", batch_tokens=8, options=shard, rank=0, world_size=1, seed=4) as p:
        assert (p.rank, p.world_size, p.loader.seed) == (0, 1, 4)  # its own arguments and keywords win
    model, dataset = replay(root, ["h1"], num_tokens=64, tokens_per_row=8, options=shard)
    assert dataset.loader.rank == 1 and dataset.loader.world_size == 2
    dataset.close()


def test_run_statistics_names_a_missing_or_damaged_record_and_its_repair(run: SynthRun, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"h9/statistics.json does not exist.*activault merge-stats"):
        v.run_statistics(tmp_path / "run", "h9")
    (tmp_path / "run/h1/statistics.json").write_text('{"count": "many"}')
    with pytest.raises(FormatError, match=r"h1/statistics.json: field 'count'.*merge-stats"):
        v.run_statistics(tmp_path / "run", "h1")
    both = v.run_statistics([tmp_path / "run", LocalStore(tmp_path / "run")], "h2")
    assert both.count == 2 * run.stats["h2"].count
