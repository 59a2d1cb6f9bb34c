"""A second model collected aligned to a stored run (`data_config.align_to`): the same tokens file for
file, the reference's data config, and refusals before weights load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from activault.collection import model as model_module
from activault.collection.pipeline import collect
from activault.config import Config
from activault.errors import ConfigError, NotFoundError
from activault.reading.aligned import AlignedLoader
from activault.tools.tiny import build_model, build_tokenizer
from support.collecting import load_hook, make_cfg, tree_bytes
from support.killing import kill_after_files
from support.synth import s3_env

HOOKS = ["models.layers.1.post", "models.layers.0.mlp.post"]
# The reference's data config differs from make_cfg's defaults where a default would be taken.
REFERENCE = {"data": {"seed": 5, "shuffle_buffer": 16}, "upload": {"batches_per_upload": 2}}


def tiny(path: Path, seed: int, vocab_size: int = 512) -> Path:
    """A tiny Llama with its own random weights and the locally trained tokenizer of `vocab_size`."""
    path.mkdir(parents=True)
    tok = build_tokenizer(path, vocab_size=vocab_size)
    build_model(path, "llama", seed=seed, vocab_size=len(tok), layers=2, d=32)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"base": tiny(root / "base", 0), "chat": tiny(root / "chat", 1), "other": tiny(root / "other", 2, 400)}


@pytest.fixture(scope="module")
def vault(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run `base`, collected once."""
    root = tmp_path_factory.mktemp("vault")
    collect(make_cfg(models["base"], root, run_name="base", **REFERENCE), show_progress=False)
    return root


def aligned(model: Path, storage: Path | str, ref: str, **over: object) -> Config:
    """A config naming only what an aligned run must: its model, run_name and align_to (make_cfg's data)."""
    data = {"align_to": ref, **over.pop("data", {})}  # type: ignore[dict-item]
    return make_cfg(model, storage, run_name="chat", data=data, **over)


def test_aligned_run_holds_the_reference_tokens_file_for_file(models, vault) -> None:
    got = collect(aligned(models["chat"], vault, str(vault / "base")), show_progress=False)
    assert got.files == 3
    for hook in HOOKS:
        names = sorted(p.name for p in (vault / "base" / hook).glob("*.safetensors"))
        assert names == sorted(p.name for p in (vault / "chat" / hook).glob("*.safetensors"))
        ref, ours = load_hook(vault / "base", hook), load_hook(vault / "chat", hook)
        for key in ("input_ids", "positions", "documents"):
            assert torch.equal(ref[key], ours[key]), key
        assert not torch.equal(ref["states"], ours["states"])  # another model's activations
    cfg = json.loads((vault / "chat" / "cfg.json").read_text())
    assert cfg["aligned_to"] == str(vault / "base")
    assert cfg["config"]["data_config"]["seed"] == 5 and cfg["config"]["data_config"]["shuffle_buffer"] == 16
    # the aligned loader reads both, the same tokens in each
    with AlignedLoader([str(vault / "base"), str(vault / "chat")], HOOKS[:1], return_ids=True) as loader:
        batches = list(loader)
    assert torch.equal(
        torch.cat([b["input_ids"] for b in batches]), load_hook(vault / "chat", HOOKS[0])["input_ids"].long()
    )


def test_another_tokenizer_is_refused_before_weights_load(models, vault, tmp_path, monkeypatch) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded before the tokenizer check")

    monkeypatch.setattr(model_module, "load_model", no_weights)
    with pytest.raises(ConfigError) as e:
        collect(aligned(models["other"], tmp_path, str(vault / "base")), show_progress=False)
    msg = str(e.value)
    first = str(vault / "base" / HOOKS[0] / "m00000-000000.safetensors")
    assert f"{first}, row 0, column " in msg and "the reference stores token id" in msg, msg
    assert "this tokenizer gives" in msg and "without data_config.align_to" in msg
    assert not (tmp_path / "chat").exists()  # nothing written


def test_first_difference_names_both_ids(models, vault, tmp_path) -> None:
    from activault.collection.align import aligned_config, check_tokens, reference
    from activault.collection.model import load_tokenizer
    from activault.collection.packing import iter_batches
    from activault.collection.repair import stored_tokens

    cfg = aligned(models["other"], tmp_path, str(vault / "base"))
    ref = reference(cfg)
    assert ref is not None
    cfg = aligned_config(cfg, ref)
    tok = load_tokenizer(cfg.transformer_config)
    ours = stored_tokens(next(iter_batches(cfg.data_config, tok)), 64)[0][0]  # row 0 as this tokenizer packs it
    stored = load_hook(vault / "base", HOOKS[0])["input_ids"][0].long()
    col = int((ours != stored).nonzero()[0])
    with pytest.raises(ConfigError) as e:
        check_tokens(cfg, tok, ref, 0)
    assert f"row 0, column {col}: the reference stores token id {int(stored[col])}, this tokenizer gives " in str(
        e.value
    )
    assert f"gives {int(ours[col])};" in str(e.value)


@pytest.mark.parametrize(
    "over, named",
    [
        ({"data": {"seq_length": 32}}, "data_config.seq_length: the reference has 64, this config 32"),
        ({"data": {"seed": 1}}, "data_config.seed: the reference has 5, this config 1"),
        ({"num_runs": 2}, "num_runs: the reference has 1, this config 2"),
        ({"upload": {"batches_per_upload": 3}}, "upload_config.batches_per_upload: the reference has 2, this config 3"),
    ],
    ids=["seq_length", "seed", "num_runs", "batches_per_upload"],
)
def test_a_conflicting_data_field_is_refused(models, vault, tmp_path, over, named) -> None:
    with pytest.raises(ConfigError) as e:
        collect(aligned(models["chat"], tmp_path, str(vault / "base"), **over), show_progress=False)
    assert named in str(e.value) and "remove these keys" in str(e.value)
    assert not (tmp_path / "chat").exists()


def test_align_to_a_missing_run_or_itself(models, vault, tmp_path) -> None:
    with pytest.raises(NotFoundError, match="data_config.align_to: .*holds no cfg.json"):
        collect(aligned(models["chat"], tmp_path, str(tmp_path / "nothing")), show_progress=False)
    itself = make_cfg(models["chat"], vault, run_name="base", data={"align_to": str(vault / "base")})
    with pytest.raises(ConfigError, match="aligns to itself"):
        collect(itself, show_progress=False)


def test_aligned_on_s3(models, moto_url, moto_bucket, monkeypatch) -> None:
    for k, v in s3_env(moto_url).items():
        monkeypatch.setenv(k, v)
    root = f"s3://{moto_bucket}"
    collect(make_cfg(models["base"], root, run_name="base", **REFERENCE), show_progress=False)
    collect(aligned(models["chat"], root, f"{root}/base"), show_progress=False)
    with AlignedLoader([f"{root}/base", f"{root}/chat"], HOOKS, return_ids=True) as loader:
        batches = list(loader)
    assert len(batches) == 3
    assert all(
        not torch.equal(b["states"][f"{root}/base"][HOOKS[0]], b["states"][f"{root}/chat"][HOOKS[0]]) for b in batches
    )


def test_resume_after_sigkill_is_byte_identical(models, tmp_path) -> None:
    over = {"data": {"n_batches": 12, "seq_length": 128, "batch_size": 4}, "upload": {"batches_per_upload": 1}}
    collect(make_cfg(models["base"], tmp_path / "vault", run_name="base", **over), show_progress=False)
    ref = str(tmp_path / "vault" / "base")
    collect(aligned(models["chat"], tmp_path / "whole", ref, **over), show_progress=False)
    want = tree_bytes(tmp_path / "whole" / "chat")

    killed = aligned(models["chat"], tmp_path / "killed", ref, **over)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(killed.model_dump(mode="json")))
    progress = tmp_path / "killed/chat/progress/machine-00000.json"
    kills = kill_after_files(path, progress, (2, 5, 8))
    assert kills >= 2, "the run finished before it could be killed; make it longer"
    done = subprocess.run(
        [sys.executable, "-m", "activault", "collect", "--config", str(path), "--quiet"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    got = tree_bytes(tmp_path / "killed" / "chat")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
