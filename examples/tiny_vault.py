"""A vault to train on, made on a laptop CPU: a tiny random-weight Llama over the demo corpus.

Two runs of the same hooks: `train` (the corpus's first 28 batches of 8 x 128 tokens) and
`heldout` (the rest, about 7,000 tokens of other documents), under `WORKDIR/vault`. Collecting
again is a no-op once both runs have finished.
    python examples/tiny_vault.py [--workdir examples-out]
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from activault import collect
from activault.config import parse_config
from activault.tools.tiny import build_tiny

HOOKS = [
    "models.layers.1.post",
    "models.layers.2.mlp.pre",
    "models.layers.2.mlp.post",
    "models.layers.3.post",
]
TRAIN_BATCHES = 28  # of the corpus's 35: the last 7 are held out


def tiny_vault(workdir: str | Path = "examples-out") -> tuple[str, str]:
    """(train run URI, held-out run URI), collected into `workdir/vault` if not there yet."""
    work = Path(workdir).absolute()
    model = work / "tiny-llama"
    if not (model / "config.json").exists():
        build_tiny(model, "llama", layers=4, d=64)
    corpus = str(resources.files("activault").joinpath("demo_corpus.jsonl"))
    runs = {
        "train": (TRAIN_BATCHES, 0),
        "heldout": (1000, TRAIN_BATCHES),
    }  # 1000: until the data runs out
    for name, (n_batches, skip) in runs.items():
        cfg = parse_config(
            {
                "run_name": name,
                "storage": str(work / "vault"),
                "transformer_config": {"model_name": str(model), "dtype": "float32", "device": "cpu"},
                "data_config": {
                    "data_key": corpus,
                    "n_batches": n_batches,
                    "start_batch": skip,
                    "seq_length": 128,
                    "batch_size": 8,
                    "seed": 0,
                },
                "upload_config": {"batches_per_upload": 4, "hooks": HOOKS},
            }
        )
        collect(cfg, show_progress=False)
    return str(work / "vault" / "train"), str(work / "vault" / "heldout")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="examples-out")
    print(tiny_vault(p.parse_args().workdir))
