"""docs/training.md's "From collect to a loaded SAE", run as written on `activault demo --keep mine`:
the SAE trained on the train split, loaded by dictionary_learning, works on raw held-out activations
and `evaluate` on the test split agrees.

Not a module's mirror: it tests a document."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from activault import TokenLoader
from activault.cli import main

pytestmark = pytest.mark.slow  # the demo's collection and 300 training steps: ~45 s on 2 cores

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_the_walkthrough_runs_on_the_demo_vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    walk = section("From collect to a loaded SAE")
    shell = re.findall(r"```bash\n(.*?)```", walk, re.S)
    code = re.findall(r"```python\n(.*?)```", walk, re.S)
    assert len(shell) == 1 and len(code) == 1
    monkeypatch.chdir(tmp_path)
    assert shell[0].split("#")[0].split() == ["activault", "demo", "--keep", "mine"]
    assert main(["demo", "--keep", "mine"]) == 0
    scope: dict = {}
    exec(code[0], scope)  # noqa: S102 - the document's own code
    printed = capsys.readouterr().out
    ev, ae, x, x_hat, features = (scope[k] for k in ("ev", "ae", "x", "x_hat", "features"))
    assert scope["folder"] == Path("mine/saes/trainer_0")
    assert "explained variance" in printed and "CE loss recovered" in printed
    r = ev.reconstruction
    assert ev.library == "dictionary_learning" and r.l0 == pytest.approx(16)
    assert ev.split == {"split": "test", "test_fraction": 0.1, "split_seed": 0}
    with TokenLoader("mine/vault/demo", hooks=[scope["hook"]], batch_tokens=4096, drop_last=False) as every:
        total = sum(len(b[scope["hook"]]) for b in every)
    assert 500 < r.tokens < total // 5  # the held-out documents' tokens only
    assert 0.5 < r.explained_variance < 1 and ev.lm is not None and 0 < ev.lm.recovered <= 1.5
    # the loaded SAE on raw held-out activations explains as much as evaluate measured (a sample: not equal)
    assert x.shape == x_hat.shape == (512, 64) and features.shape == (512, 512)
    assert int((features != 0).sum(1).max()) == 16
    ev_loaded = float(1 - (x - x_hat.detach()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ev_loaded == pytest.approx(r.explained_variance, abs=0.05)
    # the shell's evaluate, as the section gives it, prints the same explained variance
    command = re.search(r"`(activault evaluate [^`]+)`", walk.replace("\n", " "))
    assert command is not None
    assert main(command.group(1).split()[1:] + ["--no-lm"]) == 0
    assert f"explained variance  {r.explained_variance:.4f}" in capsys.readouterr().out
    assert torch.isfinite(x_hat).all()
