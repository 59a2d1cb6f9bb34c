"""The examples run end to end with few steps: the loss falls, and on held-out tokens each sparse
model explains more variance than the best dense model of the same budget (fit on the training
tokens in float64), the floor that shows it learned sparse structure rather than a subspace."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from activault import RCache, TokenLoader
from activault.integrations.shared import run_statistics

pytestmark = pytest.mark.slow  # a collection and three short trainings: about two minutes on 2 cores

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import tiny_vault as scripts do


@pytest.fixture(scope="module")
def runs(workdir: Path) -> tuple[str, str]:
    """The examples' vault (train and held-out runs), collected once for the module."""
    spec = importlib.util.spec_from_file_location("tiny_vault", EXAMPLES / "tiny_vault.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_vault(workdir)


def tokens(uri: str, hook: str, **norm: float) -> torch.Tensor:
    """Every stored token of a hook, float64 (one batch: the count is in statistics.json)."""
    n = run_statistics(uri, hook).count
    with TokenLoader(uri, hooks=[hook], batch_tokens=n, dtype=torch.float64, **norm) as loader:
        return next(iter(loader))[hook]


def pca_ev(train: torch.Tensor, held: torch.Tensor, k: int) -> float:
    """Held-out explained variance of the best k-dimensional affine code of the training tokens."""
    mean = train.mean(0)
    top = torch.linalg.svd(train - mean, full_matrices=False).Vh[:k]
    rec = (held - mean) @ top.T @ top + mean
    return float(1 - (held - rec).pow(2).sum() / (held - held.mean(0)).pow(2).sum())


def test_sae_example(runs: tuple[str, str], workdir: Path) -> None:
    import sae_saelens

    out = sae_saelens.main(workdir, steps=80)
    floor = pca_ev(tokens(runs[0], sae_saelens.HOOK), tokens(runs[1], sae_saelens.HOOK), k=8)  # ~0.35
    assert out["explained_variance_at_start"] < 0.1 < floor < out["explained_variance"], (
        floor,
        out,
    )
    assert out["l0"] == 8 and out["tokens"] > 5000
    # activault's evaluation of the saved SAE agrees with SAELens's own, and the splice recovers loss
    assert out["explained_variance_spliced_eval"] == pytest.approx(out["explained_variance"], abs=1e-3)
    assert 0 < out["ce_loss_recovered"] <= 1.5


def test_transcoder_example(runs: tuple[str, str], workdir: Path) -> None:
    import transcoder_sparsify as ex

    out = ex.main(workdir, steps=80)
    x, y = (tokens(runs[0], h) for h in ex.PAIR)
    xh, yh = (tokens(runs[1], h) for h in ex.PAIR)
    ones = lambda t: torch.cat([t, torch.ones(len(t), 1, dtype=t.dtype)], 1)  # noqa: E731
    w = torch.linalg.lstsq(ones(x), y).solution  # the best affine map MLP-in -> MLP-out
    floor = float(1 - (yh - ones(xh) @ w).pow(2).sum() / (yh - yh.mean(0)).pow(2).sum())  # ~0.17
    assert out["explained_variance_at_start"] < 0.05 < floor < out["explained_variance"], (
        floor,
        out,
    )


def test_crosscoder_example(runs: tuple[str, str], workdir: Path) -> None:
    import crosscoder_saelens as ex

    out = ex.main(workdir, steps=60)
    for h in ex.LAYERS:  # a joint 16-dim code cannot beat one layer's own best 16-dim code on it
        floor = pca_ev(tokens(runs[0], h, norm_target=8.0), tokens(runs[1], h, norm_target=8.0), k=16)
        assert out[f"{h} at start"] < 0.1 < floor < out[h], (h, floor, out)


def test_crosscoder_example_across_two_aligned_models(runs: tuple[str, str], workdir: Path) -> None:
    import crosscoder_saelens as ex

    out = ex.main_two_models(workdir, steps=60)
    pairs = ex.aligned_vault(workdir)
    for i, m in enumerate(("model 0", "model 1")):  # a joint 16-dim code against one model's own best
        train, held = (tokens(pairs[split][i], ex.PAIR_HOOK, norm_target=8.0) for split in ("train", "heldout"))
        floor = pca_ev(train, held, k=16)  # ~0.63
        assert out[f"{m} at start"] < 0.1 < floor < out[m], (m, floor, out)
    # the second model's runs hold the first's tokens, file for file
    for first, second in pairs.values():
        ids = []
        for run in (first, second):
            with RCache(run, hooks=[ex.PAIR_HOOK], return_ids=True) as cache:
                ids.append(torch.cat([item["input_ids"] for item in cache]))
        assert torch.equal(ids[0], ids[1])
