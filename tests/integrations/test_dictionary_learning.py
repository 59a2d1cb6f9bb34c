"""integrations/dictionary_learning.py: dictionary_learning's trainSAE trains a TopK SAE from a
VaultBuffer (normalised, epochs on), it explains most of the k-sparse data, and the saved SAE,
loaded the library's own way, works on raw activations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from activault import TokenLoader
from activault.errors import ConfigError, DataError, FormatError
from activault.integrations.dictionary_learning import RESCALED, VaultBuffer, finish, train
from activault.storage import LocalStore
from support.integrations import sparse_run
from support.synth import as_stats_version_1, write_synthetic_run


def _topk(steps: int) -> dict:
    from dictionary_learning.trainers import TopKTrainer

    return {
        "trainer": TopKTrainer,
        "steps": steps,
        "activation_dim": 16,
        "dict_size": 64,
        "k": 4,
        "layer": 0,
        "lm_name": "synthetic",
        "device": "cpu",
        "warmup_steps": 5,
        "seed": 0,
        "lr": 5e-3,
    }


def _explained(ae: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(1 - (x - ae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _every_token(tmp_path: Path) -> torch.Tensor:
    with TokenLoader(tmp_path / "sparse", hooks=["h_in"], batch_tokens=8192) as loader:
        return next(iter(loader))["h_in"]  # all 8192 tokens, raw: [8192, 16]


def test_dictionary_learning_trains_from_a_vault_buffer(tmp_path: Path) -> None:
    from dictionary_learning.utils import load_dictionary

    sparse_run(LocalStore(tmp_path, fsync=False))
    every = _every_token(tmp_path)
    buffer = VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=256, normalize=True, seed=0)
    assert buffer.norm_factor == pytest.approx(every.double().pow(2).sum(1).mean().sqrt().item(), rel=1e-9)
    assert next(buffer).double().pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=0.15)
    folders = train(buffer, [_topk(80)], steps=80, device="cpu", save_dir=tmp_path / "dl")
    assert folders == [tmp_path / "dl/trainer_0"]
    assert buffer.loader.state_dict()["epoch"] >= 2  # 80 x 256 tokens: the 8192-token run twice and more
    buffer.close()
    ae, config = load_dictionary(str(folders[0]), device="cpu")
    assert config[RESCALED] == buffer.norm_factor and config["buffer"]["norm_factor"] == buffer.norm_factor
    # k-sparse data, k=4 >= 3 true atoms: a trained TopK explains most of it, on RAW activations
    assert _explained(ae, every) > 0.7


def test_finish_rescales_the_saved_sae_and_checkpoints_to_raw_activations_once(tmp_path: Path) -> None:
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.training import trainSAE
    from dictionary_learning.utils import load_dictionary

    sparse_run(LocalStore(tmp_path, fsync=False))
    every = _every_token(tmp_path)
    with VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=256, normalize=True, seed=0) as buffer:
        trainSAE(
            data=buffer,
            trainer_configs=[_topk(60)],
            steps=60,
            device="cpu",
            save_dir=str(tmp_path / "dl"),
            save_steps=[30],
        )
    folder, nf = tmp_path / "dl/trainer_0", buffer.norm_factor
    normalised, _ = load_dictionary(str(folder), device="cpu")
    on_normalised = _explained(normalised, every / nf)  # what training measured
    stale = _explained(normalised, every)  # the old advice forgotten: biases in normalised units
    checkpoint = torch.load(folder / "checkpoints/ae_30.pt", weights_only=True)
    assert finish(folder, buffer) == folder
    ae, config = load_dictionary(str(folder), device="cpu")
    assert config[RESCALED] == nf
    assert _explained(ae, every) == pytest.approx(on_normalised, abs=1e-4)
    assert _explained(ae, every) > stale + 0.02, (stale, on_normalised)  # was: the stale SAE was saved
    torch.testing.assert_close(ae.b_dec, normalised.b_dec * nf)
    torch.testing.assert_close(ae.encoder.weight, normalised.encoder.weight, rtol=0, atol=0)
    rescaled = AutoEncoderTopK.from_pretrained(str(folder / "checkpoints/ae_30.pt"), k=4)
    torch.testing.assert_close(rescaled.b_dec, checkpoint["b_dec"] * nf)
    saved = (folder / "ae.pt").read_bytes()
    assert finish(folder, buffer) == folder and (folder / "ae.pt").read_bytes() == saved  # once, not twice
    assert sorted(p.name for p in folder.iterdir()) == ["ae.pt", "checkpoints", "config.json"]
    with pytest.raises(ConfigError, match=f"already rescaled by {nf}"):
        finish(folder, 2.0)


def test_train_refuses_a_second_normalisation_and_finish_a_folder_without_an_sae(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))
    with VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=256, normalize=True) as buffer:
        with pytest.raises(ConfigError, match="normalize_activations= / data="):
            train(buffer, [_topk(1)], steps=1, save_dir=tmp_path / "dl", normalize_activations=True)
        with pytest.raises(ConfigError, match="holds no ae.pt and config.json"):
            finish(tmp_path, buffer)


def test_norm_factor_leaves_out_tokens_with_nan_and_refuses_statistics_that_counted_them(tmp_path: Path) -> None:
    local = LocalStore(tmp_path, fsync=False)
    run = write_synthetic_run(local, "bad", ["h1"], machines=2, files=3, nonfinite=[("h1", 3, 2, 5, math.nan)])
    x = run.tensor("h1").reshape(-1, 8)[run.tensor("h1", "positions").reshape(-1) >= 0].double()
    finite = x[torch.isfinite(x).all(1)]
    assert finite.shape[0] == x.shape[0] - 1
    with VaultBuffer(tmp_path / "bad", "h1", out_batch_size=29, normalize=True, drop_nonfinite=True) as buffer:
        assert buffer.norm_factor == pytest.approx(finite.pow(2).sum(1).mean().sqrt().item(), rel=1e-12)
        batches = torch.cat([next(buffer) for _ in range(13)]).double()  # one epoch: 377 tokens
    assert torch.isfinite(batches).all()
    assert batches.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-5)  # every delivered token finite
    as_stats_version_1(local, "bad")  # statistics.json as written before stats_version 2
    with pytest.raises(DataError) as e:
        VaultBuffer(tmp_path / "bad", "h1", out_batch_size=29, normalize=True)
    msg = str(e.value)
    for part in (
        f"hook 'h1' of run {tmp_path / 'bad'}",
        "1 token(s) with NaN or Inf",
        "merge-stats RUN",
        "drop_nonfinite",
    ):
        assert part in msg, msg
    with VaultBuffer(tmp_path / "bad", "h1", out_batch_size=29, drop_nonfinite=True) as raw:  # not normalising
        assert torch.isfinite(next(raw)).all()


def test_a_state_of_another_hook_or_a_tampered_one_is_refused(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))
    with VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=256) as buffer:
        next(buffer)
        state = buffer.state_dict()
        for change, problem in (
            ({"hook": "h_out"}, "state was saved with hook='h_out', this buffer has 'h_in'"),  # was: accepted
            ({"loader": None}, "field 'loader' is None"),  # was: a TypeError
            ({"loader": {**state["loader"], "offset": -3}}, "whole number"),
        ):
            with pytest.raises(ConfigError) as e:
                buffer.load_state_dict({**state, **change})
            assert problem in str(e.value), str(e.value)
        assert buffer.state_dict() == state


def test_a_file_lost_from_its_hook_is_named_not_skipped(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))
    (tmp_path / "sparse/h_in/m00000-000001.safetensors").unlink()  # h_out and the progress record have it
    with pytest.raises(FormatError, match="m00000-000001.safetensors lacks h_in"):  # was: read without it
        VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=256)


def test_the_saved_config_names_the_runs_model_and_hook(tiny_model_dir: Any, tmp_path: Path) -> None:
    """trainSAE's config.json holds the run's model name, context size and hook names (was: only
    the vault's path and the activault hook), read back with the library's own load_dictionary."""
    from dictionary_learning.utils import load_dictionary

    from activault.collection.pipeline import collect
    from support.collecting import make_cfg

    llama = tiny_model_dir("llama")
    collect(make_cfg(llama, tmp_path, data={"n_batches": 2}), show_progress=False)
    hook = "models.layers.1.post"
    with VaultBuffer(tmp_path / "run", hook, out_batch_size=64, normalize=True, seed=0) as buffer:
        trainer = {**_topk(8), "activation_dim": 64, "warmup_steps": 1}
        folders = train(buffer, [trainer], steps=8, device="cpu", save_dir=tmp_path / "dl")
    _, config = load_dictionary(str(folders[0]), device="cpu")
    saved = config["buffer"]
    assert (saved["model_name"], saved["context_size"]) == (str(llama), 64)
    assert (saved["activault_hook"], saved["hook_name"]) == (hook, "blocks.1.hook_resid_post")


def test_a_run_without_cfg_json_still_trains_with_the_hook_as_its_name(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))
    (tmp_path / "sparse/cfg.json").unlink()
    with VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=64) as buffer:
        assert buffer.config["hook_name"] == buffer.config["activault_hook"] == "h_in"
        assert "model_name" not in buffer.config
