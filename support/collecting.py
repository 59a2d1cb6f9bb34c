"""What tests in several packages share about a collection: a small config over the demo corpus,
a run's files as bytes, and the CLI's output."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

from activault.cli import main
from activault.config import Config, parse_config
from activault.vault.megabatch import decode

CORPUS = str(resources.files("activault").joinpath("demo_corpus.jsonl"))


def make_cfg(model: Path, storage: Path | str, **over: Any) -> Config:
    """Two hooks of a tiny model over the demo corpus: 6 batches of 4 rows of 64 tokens, 2 batches a file."""
    data = {
        "data_key": CORPUS,
        "n_batches": 6,
        "seq_length": 64,
        "batch_size": 4,
        "clean_added_tokens": True,
        "clean_default_system_prompt": True,
    }
    data.update(over.pop("data", {}))
    upload = {"batches_per_upload": 2, "hooks": ["models.layers.1.post", "models.layers.0.mlp.post"]}
    upload.update(over.pop("upload", {}))
    raw = {
        "run_name": "run",
        "storage": str(storage),
        "transformer_config": {"model_name": str(model), "dtype": "float32", "device": "cpu"},
        "data_config": data,
        "upload_config": upload,
    }
    raw.update(over)
    return parse_config(raw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a run; cfg.json without its `storage` (the one thing that differs between copies)."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    if "cfg.json" in out:
        rec = json.loads(out["cfg.json"])
        rec["config"].pop("storage")
        out["cfg.json"] = json.dumps(rec).encode()
    return out


def load_hook(root: Path, hook: str) -> dict[str, torch.Tensor]:
    """Every file of a hook folder, decoded (checksums verified) and concatenated in file order."""
    files = sorted((root / hook).glob("*.safetensors"))
    parts = [decode(f.read_bytes(), f.name, verify_checksums=True).tensors for f in files]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `activault ARGS`, run in this process."""
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err
