"""reading/loader_state.py: TokenLoader's saved state, each field checked before a resume, each
refusal naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokens import flat_tokens

from activault.errors import ConfigError
from activault.reading.tokens import TokenLoader
from support.synth import SynthRun


def test_a_state_from_another_shuffle_or_of_another_shape_is_refused_by_name(run: SynthRun, tmp_path: Path) -> None:
    opts = dict(batch_tokens=20, window=2, seed=7)
    first = TokenLoader(tmp_path / "run/h1", **opts)
    with first:
        for k, _ in enumerate(first):
            if k == 2:
                break
        mid = first.state_dict()
    assert mid["offset"] > 0 and mid["shuffle"] == "numpy-pcg64-strata"
    old = {k: v for k, v in mid.items() if k != "shuffle"}  # saved by a loader that used torch.randperm
    with pytest.raises(ConfigError, match="shuffled with 'torch-randperm'.*window boundary \\(offset 0\\)"):
        TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(old)
    uniform = {**mid, "shuffle": "numpy-pcg64"}  # saved before the stratified shuffle
    with pytest.raises(ConfigError, match="shuffled with 'numpy-pcg64'; this one uses 'numpy-pcg64-strata'"):
        TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(uniform)
    # At a window boundary no token of the window was taken yet: resumed exactly.
    boundary = {**old, "window": np.int64(1), "offset": 0}  # numpy integers as well
    again = TokenLoader(tmp_path / "run/h1", **opts)
    again.load_state_dict(boundary)
    fresh = TokenLoader(tmp_path / "run/h1", **opts)
    fresh.load_state_dict({**mid, "window": 1, "offset": 0})
    assert torch.equal(torch.cat(list(again)), torch.cat(list(fresh)))
    for bad, match in (
        ({}, "not a TokenLoader state_dict: no epoch, window, offset"),
        ([1, 2], "not a TokenLoader state_dict: a list"),
        ({**mid, "offset": -1}, "field 'offset' is -1, not a whole number >= 0"),
        ({**mid, "window": "1"}, "field 'window' is '1', not a whole number"),
        ({**mid, "epoch": True}, "field 'epoch' is True, not a whole number"),
        ({**mid, "seed": 8}, "saved with seed=8, this loader has 7: make the loader with seed=8"),
        ({**mid, "window_files": 3}, "saved with window_files=3, this loader has 2: make the loader with window=3"),
    ):
        with pytest.raises(ConfigError, match=match):
            TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(bad)  # type: ignore[arg-type]


def test_every_position_field_has_an_upper_bound(run: SynthRun, tmp_path: Path) -> None:
    # 6 files, window 2: windows [0, 1], [2, 3], [4, 5] (the ramp cuts none); 64 tokens a file, less padding.
    opts = dict(batch_tokens=20, window=2, seed=7)
    state = TokenLoader(tmp_path / "run/h1", **opts).state_dict()
    for bad, match in (
        ({**state, "epoch": 2**63}, f"field 'epoch' is {2**63}, not a whole number 0..{2**63 - 1}"),
        ({**state, "window": 4}, "field 'window' is 4, not a whole number 0..3"),
        ({**state, "window": 3, "offset": 1}, "field 'offset' is 1, not a whole number 0..0"),
    ):
        with pytest.raises(ConfigError, match=match):
            TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(bad)
    end = TokenLoader(tmp_path / "run/h1", **opts)
    end.load_state_dict({**state, "window": 3, "offset": 0})  # the epoch's end: nothing left
    assert list(end) == []
    # The offset's bound is the window's kept tokens, known once it is read: refused then, by name.
    over = TokenLoader(tmp_path / "run/h1", **opts)
    over.load_state_dict({**state, "window": 0, "offset": 128})
    with pytest.raises(ConfigError, match=r"field 'offset' is 128, not a whole number 0\.\.127 \(window 0 of epoch 0"):
        next(iter(over))


def test_a_state_saved_before_the_ramp_resumes_exactly_without_it(run: SynthRun, tmp_path: Path) -> None:
    opts = dict(batch_tokens=20, window=4, seed=5, return_ids=True)
    old = TokenLoader(tmp_path / "run/h1", ramp=False, **opts)  # windows of 4 files from the start
    full = list(old)
    first = TokenLoader(tmp_path / "run/h1", ramp=False, **opts)
    with first:
        for k, _ in enumerate(first):
            if k == 3:
                break
        state = {k: v for k, v in first.state_dict().items() if k != "ramp"}  # as saved before the key
    with pytest.raises(
        ConfigError, match="saved with ramp=False, this loader has first-window: make the loader with ramp=False"
    ):
        TokenLoader(tmp_path / "run/h1", **opts).load_state_dict(state)
    # A state of the ramp that cut windows of 1, 2, 4, ... files: other windows, refused by name.
    with pytest.raises(ConfigError, match="ramp cut windows of 1, 2, 4, ... files.*start this loader afresh"):
        TokenLoader(tmp_path / "run/h1", **opts).load_state_dict({**state, "ramp": True})
    with pytest.raises(ConfigError, match="saved with ramp=first-window, this loader has False: .* ramp=True"):
        TokenLoader(tmp_path / "run/h1", ramp=False, **opts).load_state_dict({**state, "ramp": "first-window"})
    again = TokenLoader(tmp_path / "run/h1", ramp=False, **opts)
    again.load_state_dict(state)
    assert flat_tokens(list(again)) == flat_tokens(full[4:])
