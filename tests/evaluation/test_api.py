"""evaluation/api.py: an identity SAE explains everything and recovers all the loss, a zero SAE none;
SAEs trained a few steps by SAELens and dictionary_learning load from their saved folders and
measure what float64 over every stored token measures; a held-out split measures exactly its
documents' tokens; locally and on S3; one message per mistake."""

from __future__ import annotations

import json
import shutil
from collections import Counter
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


class Recorder(Identity):
    """An identity SAE that keeps every token it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x


def _tokens(states: torch.Tensor) -> Counter:
    """The multiset of token vectors [n, d]."""
    return Counter(tuple(row) for row in states.tolist())


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


def test_a_held_out_split_measures_exactly_its_documents_tokens(collected, in_split) -> None:
    _, root = collected
    stored = load_hook(root, HOOK)
    measured = {}
    for side in ("test", "train"):
        rec = Recorder()
        ev = evaluate(str(root), rec, hook=HOOK, split=side, test_fraction=0.3, lm=False)
        want = stored["states"][in_split(root, HOOK, side, 0.3)]
        assert ev.reconstruction.tokens == len(want) > 100
        assert ev.split == {"split": side, "test_fraction": 0.3, "split_seed": 0}
        measured[side] = _tokens(torch.cat(rec.seen))
        assert measured[side] == _tokens(want)
    # Disjoint and covering, token for token (equal vectors, e.g. documents' first tokens, are counted).
    test, train = in_split(root, HOOK, "test", 0.3), in_split(root, HOOK, "train", 0.3)
    assert not (test & train).any() and torch.equal(test | train, stored["positions"] >= 0)
    assert measured["test"] + measured["train"] == _tokens(stored["states"][stored["positions"] >= 0])


def test_a_held_out_splits_lm_loss_is_its_documents_share_of_the_whole(collected) -> None:
    # Documents are isolated: the other side's documents left out change nothing for those kept,
    # so the predicted tokens and loss sums of test and train add up to those of the whole run.
    _, root = collected
    whole = evaluate(str(root), Identity(), hook=HOOK)
    test = evaluate(str(root), Identity(), hook=HOOK, split="test", test_fraction=0.3)
    train = evaluate(str(root), Identity(), hook=HOOK, split="train", test_fraction=0.3)
    assert whole.lm is not None and test.lm is not None and train.lm is not None
    assert test.lm.tokens + train.lm.tokens == whole.lm.tokens and 0 < test.lm.tokens < train.lm.tokens
    for kind in ("clean", "zero"):
        total = getattr(test.lm, kind) * test.lm.tokens + getattr(train.lm, kind) * train.lm.tokens
        assert total == pytest.approx(getattr(whole.lm, kind) * whole.lm.tokens, rel=1e-5)
    assert test.lm.recovered == 1.0
    other_seed = evaluate(str(root), Identity(), hook=HOOK, split="test", test_fraction=0.3, split_seed=1, lm=False)
    assert other_seed.reconstruction.tokens != test.reconstruction.tokens  # another choice of documents


def test_a_split_with_no_tokens_or_options_without_a_split_name_the_fix(collected) -> None:
    _, root = collected
    with pytest.raises(ConfigError, match=r"no finite token .* split='test' .*: raise test_fraction"):
        evaluate(str(root), Identity(), hook=HOOK, split="test", test_fraction=1e-12, lm=False)
    with pytest.raises(ConfigError, match="test_fraction given without split: pass split='test'"):
        evaluate(str(root), Identity(), hook=HOOK, test_fraction=0.3)
    with pytest.raises(ConfigError, match="split='held' is not accepted"):
        evaluate(str(root), Identity(), hook=HOOK, split="held")


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
    local = evaluate(str(root), sae, hook=HOOK, split="test", test_fraction=0.3)
    remote = evaluate(f"s3://{moto_bucket}/run/{HOOK}", sae, split="test", test_fraction=0.3)
    assert remote.reconstruction == local.reconstruction and remote.lm == local.lm and remote.split == local.split


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
    held = ["--split", "test", "--test-fraction", "0.3", "--no-lm"]
    rc, out, _ = run_cli(["evaluate", str(root / HOOK), str(tmp_path / "sae"), *held], capsys)
    want = evaluate(str(root), tmp_path / "sae", hook=HOOK, split="test", test_fraction=0.3, lm=False)
    assert rc == 0 and f"{want.reconstruction.tokens:,} tokens of split test (test_fraction 0.3, split_seed 0)" in out
    seeded = [*held, "--split-seed", "1", "--json"]
    rc, out, _ = run_cli(["evaluate", str(root / HOOK), str(tmp_path / "sae"), *seeded], capsys)
    assert rc == 0 and json.loads(out)["split"] == {"split": "test", "test_fraction": 0.3, "split_seed": 1}
    rc, _, err = run_cli(["evaluate", str(root / HOOK), str(tmp_path / "sae"), "--split-seed", "1"], capsys)
    assert rc == 2 and "split_seed given without split" in err
