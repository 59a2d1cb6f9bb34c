"""evaluation/api.py: an identity SAE explains everything and recovers all the loss, a zero SAE none;
SAEs trained a few steps by SAELens and dictionary_learning load from their saved folders and
measure what float64 over every stored token measures; locally and on S3; one message per mistake."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from activault.errors import ConfigError, NotFoundError
from activault.evaluation import evaluate
from activault.storage.s3 import S3Store
from support.collecting import load_hook, run_cli
from support.synth import copy_tree, s3_env

HOOK = "models.layers.1.post"


class Identity(torch.nn.Module):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Zero(torch.nn.Module):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 16)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(z.shape[0], 64)


def _float64_ev(sae: torch.nn.Module, root: Path) -> float:
    stored = load_hook(root, HOOK)
    x = stored["states"][stored["positions"] >= 0].double()
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x.float())).double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_identity_recovers_everything_and_zero_nothing(collected) -> None:
    _, root = collected
    ident = evaluate(str(root), Identity(), hook=HOOK)
    assert ident.reconstruction.explained_variance == 1.0 and ident.reconstruction.mse == 0.0
    assert ident.lm is not None and ident.lm.recovered == 1.0 and ident.lm.tokens > 1000
    stored = load_hook(root, HOOK)
    assert ident.reconstruction.tokens == int((stored["positions"] >= 0).sum())  # every real token, no padding
    zero = evaluate(str(root / HOOK), Zero())  # the hook's folder names the hook
    assert zero.hook == HOOK and zero.lm is not None and zero.lm.recovered == 0.0
    assert zero.reconstruction.l0 == 0.0 and zero.reconstruction.dead == 16
    assert zero.lm.clean == ident.lm.clean and zero.lm.zero == ident.lm.zero  # the same predicted tokens


def test_max_tokens_bounds_both_measures(collected) -> None:
    _, root = collected
    ev = evaluate(str(root), Identity(), hook=HOOK, max_tokens=100)
    assert ev.reconstruction.tokens == 100
    assert ev.lm is not None and ev.lm.tokens < 128  # two 64-token rows, less the document ends
    with pytest.raises(ConfigError, match="max_tokens 0"):
        evaluate(str(root), Identity(), hook=HOOK, max_tokens=0)


@pytest.mark.s3
def test_a_run_on_s3_evaluates_as_the_local_one(collected, moto_url, moto_bucket, monkeypatch) -> None:
    _, root = collected
    env = s3_env(moto_url)
    copy_tree(root, S3Store(f"s3://{moto_bucket}", env=env), "run")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    sae = torch.nn.Sequential()  # any encode/decode object: a random linear code
    w = torch.randn(64, 32) / 8
    sae.encode = lambda x: torch.relu(x @ w)  # type: ignore[method-assign]
    sae.decode = lambda z: z @ w.T  # type: ignore[method-assign]
    local = evaluate(str(root), sae, hook=HOOK)
    remote = evaluate(f"s3://{moto_bucket}/run/{HOOK}", sae)
    assert remote.reconstruction == local.reconstruction and remote.lm == local.lm


def test_saelens_sae_trained_on_the_run_evaluates_from_its_folder(collected, tmp_path) -> None:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from activault.integrations.saelens import VaultProvider

    _, root = collected
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=128, k=4))
    cfg = SAETrainerConfig(total_training_samples=20 * 64, train_batch_size_samples=64, lr=1e-3, lr_end=1e-3)
    with VaultProvider(root, HOOK, batch_tokens=64, seed=0) as provider:
        SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
    sae.save_model(tmp_path / "sae")
    ev = evaluate(str(root), tmp_path / "sae", hook=HOOK)
    assert ev.library == "saelens"
    assert ev.reconstruction.explained_variance == pytest.approx(_float64_ev(sae, root), abs=1e-5)
    assert ev.reconstruction.l0 == pytest.approx(4.0) and ev.lm is not None and ev.lm.tokens > 1000


def test_dictionary_learning_sae_trained_on_the_run_evaluates_from_its_folder(collected, tmp_path) -> None:
    from dictionary_learning.trainers import TopKTrainer
    from dictionary_learning.training import trainSAE
    from dictionary_learning.utils import load_dictionary

    from activault.integrations.dictionary_learning import VaultBuffer

    _, root = collected
    trainer = {
        "trainer": TopKTrainer,
        "steps": 20,
        "activation_dim": 64,
        "dict_size": 128,
        "k": 4,
        "layer": 1,
        "lm_name": "tiny",
        "device": "cpu",
        "warmup_steps": 2,
        "seed": 0,
    }
    with VaultBuffer(root, HOOK, out_batch_size=64) as buffer:
        trainSAE(data=buffer, trainer_configs=[trainer], steps=20, device="cpu", save_dir=str(tmp_path / "dl"))
    ev = evaluate(str(root), tmp_path / "dl" / "trainer_0", hook=HOOK, lm=False)
    ae, _ = load_dictionary(str(tmp_path / "dl" / "trainer_0"), device="cpu")
    assert ev.library == "dictionary_learning" and ev.lm is None and ev.lm_note == "not asked for"
    assert ev.reconstruction.explained_variance == pytest.approx(_float64_ev(ae, root), abs=1e-5)
    assert ev.reconstruction.l0 <= 4.0


def test_mistakes_name_the_fix(collected, tmp_path) -> None:
    model, root = collected
    with pytest.raises(ConfigError, match=r"has hooks .*: name one \(--hook H"):
        evaluate(str(root), Identity())
    with pytest.raises(NotFoundError, match="has no hook 'models.layers.9.post'; its hooks"):
        evaluate(str(root), Identity(), hook="models.layers.9.post")
    with pytest.raises(NotFoundError, match="holds no cfg.json"):
        evaluate(str(tmp_path), Identity(), hook=HOOK)
    moved = tmp_path / "vault" / "run"
    shutil.copytree(root, moved)
    rec = json.loads((moved / "cfg.json").read_text())
    rec["config"]["transformer_config"]["model_name"] = str(tmp_path / "gone")
    (moved / "cfg.json").write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match=r"not on this machine .*--model PATH"):
        evaluate(str(moved), Identity(), hook=HOOK)
    ev = evaluate(str(moved), Identity(), hook=HOOK, model=str(model))  # a local copy of the run's model
    assert ev.lm is not None and ev.lm.recovered == 1.0


def test_the_command_prints_the_evaluation(collected, tmp_path, capsys) -> None:
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    _, root = collected
    TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=32, k=2)).save_model(tmp_path / "sae")
    rc, out, _ = run_cli(["evaluate", str(root), str(tmp_path / "sae"), "--hook", HOOK, "--json"], capsys)
    got = json.loads(out)
    assert rc == 0 and got["library"] == "saelens" and got["reconstruction"]["l0"] == pytest.approx(2.0)
    assert set(got["lm"]) == {"tokens", "clean", "sae", "zero", "recovered"}
    rc, out, _ = run_cli(["evaluate", str(root / HOOK), str(tmp_path / "sae"), "--max-tokens", "64"], capsys)
    assert rc == 0 and "CE loss recovered" in out and "64 tokens" in out
    rc, _, err = run_cli(["evaluate", str(root / HOOK), str(tmp_path)], capsys)
    assert rc == 2 and "holds no saved SAE" in err
