"""The launch tests' config (num_runs=N) and a fake `sbatch` first on PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from support.launching import FAKE_SBATCH, N


@pytest.fixture
def config(tmp_path: Path) -> Path:
    raw = {
        "run_name": "r",
        "num_runs": N,
        "storage": str(tmp_path / "vault"),
        "transformer_config": {"model_name": "m"},
        "data_config": {"data_key": "x.jsonl", "n_batches": 8, "seq_length": 8, "batch_size": 1},
        "upload_config": {"batches_per_upload": 1, "hooks": ["models.layers.0.post"]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def sbatch(tmp_path: Path, monkeypatch) -> Path:
    """A fake `sbatch` first on PATH: it records its arguments and environment, and prints a job id."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.chdir(tmp_path)
    return fake
