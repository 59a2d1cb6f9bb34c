"""integrations/sparsify.py: sparsify trains an SAE and a transcoder from a vault (replay) below the
best dense code of the same budget, and its dataset resumes by state or by reading forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from activault import TokenLoader
from activault.errors import ActivaultError, ConfigError
from activault.integrations.sparsify import replay, save_metadata
from activault.storage import LocalStore
from support.integrations import sparse_run


def dense_baselines(root: Path) -> tuple[float, float]:
    """FVU of the best dense codes the sparse ones must beat, fit and scored on every token (float64):
    PCA with k=4 components of h_in (an SAE's budget), and the least-squares affine map h_in -> h_out."""
    with TokenLoader(root, hooks=["h_in", "h_out"], batch_tokens=8192, dtype=torch.float64) as loader:
        batch = next(iter(loader))
    x, y = batch["h_in"], batch["h_out"]
    xc = x - x.mean(0)
    top = torch.linalg.svd(xc, full_matrices=False).Vh[:4]
    pca = float((xc - xc @ top.T @ top).pow(2).sum() / xc.pow(2).sum())
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    fit = xa @ torch.linalg.lstsq(xa, y).solution
    return pca, float((y - fit).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_sparsify_trains_an_sae_and_a_transcoder_from_the_vault(tmp_path: Path) -> None:
    from sparsify import SaeConfig, TrainConfig, Trainer, TranscoderConfig

    sparse_run(LocalStore(tmp_path, fsync=False))
    pca_fvu, linear_fvu = dense_baselines(tmp_path / "sparse")
    cases = (
        (["h_in"], SaeConfig(k=4, num_latents=64), 5e-3, pca_fvu),
        ({"mlp": ("h_in", "h_out")}, TranscoderConfig(k=4, num_latents=64), 2e-2, linear_fvu),
    )
    for points, coder_cfg, lr, floor in cases:
        model, dataset = replay(tmp_path / "sparse", points, num_tokens=60 * 8 * 32, tokens_per_row=32)
        cfg = TrainConfig(
            coder_cfg,
            batch_size=8,
            hookpoints=model.hookpoints,
            optimizer="adam",
            lr=lr,
            lr_warmup_steps=5,
            log_to_wandb=False,
            save_dir=str(tmp_path / "ckpt"),
            save_every=10**9,
        )
        trainer = Trainer(cfg, dataset, model)
        fvu: list[float] = []
        coder = next(iter(trainer.saes.values()))
        coder.register_forward_hook(lambda _m, _i, out, fvu=fvu: fvu.append(float(out.fvu.detach())))
        trainer.fit()
        dataset.close()
        assert len(fvu) == 60 and dataset.position == 60 * 8
        # From ~1 (biases at the mean) to below the best dense code of the same budget, in 60 steps:
        # the data is exactly 3-sparse, which only a sparse code can exploit.
        assert sum(fvu[-5:]) / 5 < floor < fvu[0], (floor, fvu)


def test_sparsify_dataset_resumes_by_state_or_by_reading_forward(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))

    def make():
        return replay(tmp_path / "sparse", ["h_in"], num_tokens=50 * 32, tokens_per_row=32, rows_per_read=3)  # noqa: E731

    model, full = make()
    want = [full[i]["input_ids"] for i in range(50)]
    model, first = make()
    for i in range(17):
        first[i]
    state = first.state_dict()
    model, again = make()
    again.load_state_dict(state)
    assert again.state_dict() == state  # saved again before reading: the same position
    assert all(torch.equal(again[i]["input_ids"], want[i]) for i in range(17, 50))
    model, forward = make()
    rest = forward.select(range(17, 50))  # what sparsify calls when resuming at step 17 // batch_size
    assert len(rest) == 33 and all(torch.equal(rest[j]["input_ids"], want[17 + j]) for j in range(33))
    seen: list[torch.Tensor] = []
    model.get_submodule("h_in").register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    ids = torch.stack([want[17], want[18]])
    model(ids)  # what sparsify's Trainer does with a batch of the rows handed out
    with TokenLoader(tmp_path / "sparse", hooks=["h_in"], batch_tokens=8192, return_ids=True) as loader:
        batch = next(iter(loader))
    stored = {(int(i), s.numpy().tobytes()) for i, s in zip(batch["input_ids"], batch["states"]["h_in"], strict=True)}
    assert seen[0].shape == (2, 32, 16)
    assert all(
        (int(i), s.numpy().tobytes()) in stored for i, s in zip(ids.reshape(-1), seen[0].reshape(-1, 16), strict=True)
    )
    with pytest.raises(ActivaultError, match="not the ones"):
        model(ids)  # those rows were consumed: the next queued are rows 19 and 20
    with pytest.raises(ActivaultError, match="already read"):
        forward[3]
    for d in (full, first, again, forward):
        d.close()


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"in_chunk": -3}, "field 'in_chunk' is -3, not a whole number 0..3"),  # was: repeated rows
        ({"in_chunk": 4}, "field 'in_chunk' is 4, not a whole number 0..3"),  # was: an IndexError later
        ({"position": -1}, "field 'position' is -1"),
        ({"in_chunk": 1.0}, "field 'in_chunk' is 1.0"),
        ({"loader": None}, "field 'loader' is None"),
        ({"loader": {"epoch": 0}}, "not a TokenLoader state_dict"),
    ],
)
def test_a_tampered_dataset_state_is_one_error_naming_the_field(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))
    _, dataset = replay(tmp_path / "sparse", ["h_in"], num_tokens=50 * 32, tokens_per_row=32, rows_per_read=3)
    for i in range(4):
        dataset[i]
    state = dataset.state_dict()
    with pytest.raises(ConfigError) as e:
        dataset.load_state_dict({**state, **change})
    assert problem in str(e.value), str(e.value)
    assert dataset.state_dict() == state  # refused before anything changed: reading goes on
    _, fresh = replay(tmp_path / "sparse", ["h_in"], num_tokens=50 * 32, tokens_per_row=32, rows_per_read=3)
    want = [fresh[i]["input_ids"] for i in range(6)]
    assert all(torch.equal(dataset[i]["input_ids"], want[i]) for i in (4, 5))
    for d in (dataset, fresh):
        d.close()


def test_saved_coders_name_the_runs_model_and_hook(tiny_model_dir: Any, tmp_path: Path) -> None:
    """Each coder's cfg.json holds the run's model name, context size and hook names (was: none of
    them), and sparsify still loads the coder from it."""
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

    from activault.collection.pipeline import collect
    from support.collecting import make_cfg

    llama = tiny_model_dir("llama")
    collect(make_cfg(llama, tmp_path, data={"n_batches": 2}), show_progress=False)
    hook = "models.layers.1.post"
    model, dataset = replay(tmp_path / "run", [hook], num_tokens=4 * 4 * 32, tokens_per_row=32)
    cfg = TrainConfig(
        SaeConfig(k=4, num_latents=32),
        batch_size=4,
        hookpoints=model.hookpoints,
        log_to_wandb=False,
        save_dir=str(tmp_path / "ckpt"),
        run_name="sae",
    )
    trainer = Trainer(cfg, dataset, model)
    trainer.fit()
    dataset.close()
    files = save_metadata(trainer, model)
    assert tmp_path / "ckpt/sae" / hook / "cfg.json" in files
    for file in files:
        saved = json.loads(file.read_text())
        assert (saved["model_name"], saved["context_size"]) == (str(llama), 64)
        assert (saved["activault_hook"], saved["hook_name"]) == (hook, "blocks.1.hook_resid_post")
        assert SparseCoder.load_from_disk(file.parent).d_in == 64
    with pytest.raises(ConfigError, match="call save_metadata after trainer.fit"):
        save_metadata(tmp_path / "elsewhere", model)


def test_a_transcoder_names_its_output_hook_too(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))
    model, dataset = replay(tmp_path / "sparse", {"mlp": ("h_in", "h_out")}, num_tokens=64, tokens_per_row=32)
    dataset.close()
    assert model.metadata["mlp"] == {
        "activault_hook": "h_in",
        "hook_name": "h_in",
        "activault_output_hook": "h_out",
        "output_hook_name": "h_out",
    }
