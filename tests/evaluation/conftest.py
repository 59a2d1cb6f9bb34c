"""What the evaluation tests share: tiny models' runs over a local corpus whose data runs out, and
which of their tokens a held-out split keeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from activault.collection.pipeline import collect
from activault.reading.splits import Split
from activault.vault.megabatch import decode
from support.collecting import make_cfg
from support.packing import corpus_rows, write_jsonl


@pytest.fixture(scope="package")
def collected_arch(tiny_model_dir, tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """`collected_arch(arch)`: (model folder, run folder), collected once per architecture: documents
    split across rows, several a row, the last row padded; no token cleaned (all forwarded are stored)."""
    runs: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in runs:
            model = tiny_model_dir(arch)
            out = tmp_path_factory.mktemp(f"eval-{arch}")
            corpus = write_jsonl(out / "corpus.jsonl", corpus_rows()[:25])
            data = {"data_key": str(corpus), "n_batches": 40, "clean_added_tokens": False, "shuffle_buffer": 8}
            collect(make_cfg(model, out / "vault", data=data), show_progress=False)
            runs[arch] = (model, out / "vault" / "run")
        return runs[arch]

    return get


@pytest.fixture(scope="package")
def collected(collected_arch) -> tuple[Path, Path]:
    """The tiny Llama's run."""
    return collected_arch("llama")


@pytest.fixture(scope="package")
def in_split() -> Callable[[Path, str, str, float], torch.Tensor]:
    """`in_split(root, hook, side, test_fraction)`: [rows, seq] bool over the hook's files in storage
    order (load_hook's), True for the real tokens of that side's documents, from splits.py directly."""

    def mask(root: Path, hook: str, side: str, test_fraction: float) -> torch.Tensor:
        split = Split(side, test_fraction, 0)
        parts = []
        for f in sorted((root / hook).glob("*.safetensors")):
            t = decode(f.read_bytes(), f.name).tensors
            keep = split.keep(f.name, t["documents"].numpy().reshape(-1), f.name)
            parts.append(torch.from_numpy(keep).reshape(t["positions"].shape) & (t["positions"] >= 0))
        return torch.cat(parts)

    return mask
