"""A transcoder from two aligned hooks: the MLP's input -> its output, trained with EleutherAI sparsify.

sparsify's `Trainer` trains by hooking a live model; `replay` gives it a stand-in whose module
`models.layers.2.mlp` receives the stored `mlp.pre` states and returns the stored `mlp.post`
states of the very same tokens, so sparsify's own loop trains a transcoder from the vault.
    python examples/transcoder_sparsify.py [--steps 300] [--workdir examples-out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sparsify import TrainConfig, Trainer, TranscoderConfig
from tiny_vault import tiny_vault

from activault import TokenLoader
from activault.integrations.sparsify import replay

MLP = "models.layers.2.mlp"
PAIR = (f"{MLP}.pre", f"{MLP}.post")


@torch.no_grad()
def explained_variance(coder: torch.nn.Module, uri: str) -> float:
    """1 - sum |y - y_hat|^2 / sum |y - mean y|^2 over every token of a run (float64 sums)."""
    err, sq, total, n = 0.0, 0.0, torch.zeros(64, dtype=torch.float64), 0
    with TokenLoader(uri, hooks=list(PAIR), batch_tokens=4096, drop_last=False, dtype=torch.float32) as loader:
        for batch in loader:
            x, y = batch[PAIR[0]], batch[PAIR[1]]
            y_hat = coder(x, y).sae_out
            err += float((y - y_hat).double().pow(2).sum())
            sq += float(y.double().pow(2).sum())
            total += y.double().sum(0)
            n += y.shape[0]
    return 1 - err / (sq - float(total.pow(2).sum()) / n)


def main(
    workdir: str | Path = "examples-out", steps: int = 300, rows: int = 16, tokens_per_row: int = 64
) -> dict[str, float]:
    train, heldout = tiny_vault(workdir)
    model, dataset = replay(train, {MLP: PAIR}, num_tokens=steps * rows * tokens_per_row, tokens_per_row=tokens_per_row)
    cfg = TrainConfig(
        TranscoderConfig(k=8, num_latents=512),
        batch_size=rows,
        hookpoints=model.hookpoints,
        optimizer="adam",
        lr=2e-3,
        lr_warmup_steps=10,
        log_to_wandb=False,
        save_dir=str(Path(workdir) / "sparsify"),
        save_every=10**9,
    )
    trainer = Trainer(cfg, dataset, model)
    coder = trainer.saes[MLP]
    first = explained_variance(coder, heldout)
    trainer.fit()
    dataset.close()
    return {
        "explained_variance_at_start": first,
        "explained_variance": explained_variance(coder, heldout),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="examples-out")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    print(main(args.workdir, args.steps))
