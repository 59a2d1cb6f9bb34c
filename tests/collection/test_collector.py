"""collection/collector.py, the file-filling loop: the last partial file, data running out, records
without files, and tokens holding NaN or Inf counted or refused."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from activault.collection.pipeline import collect
from activault.errors import ActivaultError
from activault.storage import LocalStore
from activault.tools.verify import verify_run
from support.collecting import load_hook, make_cfg


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def test_final_partial_megabatch_is_written(llama, tmp_path):
    cfg = make_cfg(llama, tmp_path, data={"n_batches": 5})
    r = collect(cfg, show_progress=False)
    t = load_hook(tmp_path / "run", "models.layers.1.post")
    assert r.files == 3 and t["states"].shape[0] == 20


def test_data_running_out_ends_cleanly_with_padding(llama, tmp_path, caplog):
    cfg = make_cfg(
        llama,
        tmp_path,
        data={"n_batches": 10_000, "seq_length": 256, "batch_size": 8},
        upload={"batches_per_upload": 4},
    )
    with caplog.at_level(logging.INFO, logger="activault.collection.pipeline"):
        r = collect(cfg, show_progress=False)
    assert 0 < r.files < r.files_planned == 2500
    last = caplog.records[-1].getMessage()
    assert last == (
        f"machine 0: {r.files} of 2500 planned files written; the data ran out first (every document was collected)"
    )
    t = load_hook(tmp_path / "run", "models.layers.1.post")
    pos = t["positions"]
    assert (pos[:-1] >= 0).all()  # only the last row may hold padding
    pad = pos[-1] < 0
    assert pad.any() and (t["states"][-1][pad] == 0).all()
    st = json.loads((tmp_path / "run/models.layers.1.post/statistics.json").read_text())
    assert st["count"] == int((pos >= 0).sum())


def test_skip_cache_stores_no_megabatches(llama, tmp_path):
    collect(make_cfg(llama, tmp_path, data={"skip_cache": True}), show_progress=False)
    assert not list((tmp_path / "run").rglob("*.safetensors"))
    assert (tmp_path / "run/models.layers.1.post/statistics.json").exists()


@pytest.fixture
def nan_in_first_batch(monkeypatch):
    """Every activation of the first hook's first forward pass becomes NaN."""
    from activault.collection import hooks

    calls = []

    class Poisoned(hooks.Capture):
        def __call__(self, *args, **kwargs):
            acts = super().__call__(*args, **kwargs)
            h = next(iter(acts))
            if acts[h].device.type == "meta":  # hook_dims' forward on the weightless skeleton
                return acts
            if not calls:
                acts[h] = torch.full_like(acts[h], float("nan"))
            calls.append(1)
            return acts

    monkeypatch.setattr(hooks, "Capture", Poisoned)


def test_nonfinite_activations_are_counted_with_warn(llama, tmp_path, nan_in_first_batch, caplog):
    cfg = make_cfg(llama, tmp_path)
    h0, h1 = cfg.upload_config.hooks
    with caplog.at_level(logging.WARNING):
        result = collect(cfg, show_progress=False)
    n = int((load_hook(tmp_path / "run", h0)["states"].isnan().any(-1)).sum())
    assert n > 0 and result.nonfinite == {h0: n, h1: 0}
    assert f"machine 0, file 0, hook {h0}: {n} token(s) hold NaN or Inf" in caplog.text
    assert json.loads((tmp_path / f"run/{h0}/statistics.json").read_text())["nonfinite"] == n
    progress = json.loads((tmp_path / "run/progress/machine-00000.json").read_text())
    assert progress["stats"][h0]["nonfinite"] == n and progress["stats"][h1]["nonfinite"] == 0
    notes = verify_run(LocalStore(tmp_path), "run", deep=True).notes
    assert any(note.startswith(f"{h0}: {n} token(s) with NaN or Inf in 1 file(s)") for note in notes)


def test_nonfinite_activations_stop_the_run_with_error(llama, tmp_path, nan_in_first_batch):
    cfg = make_cfg(llama, tmp_path, upload={"on_nonfinite": "error"})
    with pytest.raises(ActivaultError, match="machine 0, file 0, hook .*hold NaN or Inf; nothing of this file"):
        collect(cfg, show_progress=False)
    assert list((tmp_path / "run").rglob("*.safetensors")) == []


@pytest.fixture
def float32_beyond_bfloat16(monkeypatch):
    """The first hook's module returns float32 (a module kept in another precision) in a bfloat16
    model, one value of each forward pass beyond bfloat16's largest (3.39e38)."""
    from activault.collection import hooks

    class Upcast(hooks.Capture):
        def __call__(self, *args, **kwargs):
            acts = super().__call__(*args, **kwargs)
            h = next(iter(acts))
            if acts[h].device.type == "meta":
                return acts
            acts[h] = acts[h].float()
            acts[h][0, 1, 2] = 3.4e38  # float32 holds it; bfloat16 rounds it to Inf
            return acts

    monkeypatch.setattr(hooks, "Capture", Upcast)


def test_a_value_the_stored_dtype_cannot_hold_is_counted_apart_from_the_models_own(
    llama, tmp_path, float32_beyond_bfloat16, caplog
):
    """Stored as Inf (the bytes stay what the stored dtype can hold), counted with NaN/Inf, and the
    warning says how many were finite where the module computed them; on_nonfinite: error stops."""
    bf16 = {"model_name": str(llama), "dtype": "bfloat16", "device": "cpu"}
    cfg = make_cfg(llama, tmp_path, transformer_config=bf16)
    h0 = cfg.upload_config.hooks[0]
    with caplog.at_level(logging.WARNING):
        result = collect(cfg, show_progress=False)
    assert result.nonfinite[h0] == 6 == int(load_hook(tmp_path / "run", h0)["states"].isinf().sum())  # 6 batches
    for k in range(3):  # 2 batches a file
        assert (
            f"machine 0, file {k}, hook {h0}: 2 token(s) hold NaN or Inf (2 of them finite in the module's "
            "float32 output, beyond bfloat16's largest value: stored as Inf)"
        ) in caplog.text
    stop = make_cfg(llama, tmp_path / "e", transformer_config=bf16, upload={"on_nonfinite": "error"})
    with pytest.raises(ActivaultError, match=r"2 of them finite in the module's float32 output.*bfloat16 or float32"):
        collect(stop, show_progress=False)
