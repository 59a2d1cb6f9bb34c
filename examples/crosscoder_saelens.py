"""A crosscoder across two layers: one dictionary whose latents read and write layers 1 and 3.

An acausal crosscoder's encoder sees both layers and each latent decodes into both, which is a
SAELens TopK SAE over the two layers' states side by side. `VaultProvider(concat=True)` gives
those `[tokens, 64 + 64]` batches, each layer scaled to mean norm sqrt(64) from its own exact
statistics so that neither dominates the loss; the held-out explained variance is per layer.
    python examples/crosscoder_saelens.py [--steps 600] [--workdir examples-out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from tiny_vault import tiny_vault

from activault import TokenLoader
from activault.integrations.saelens import VaultProvider

LAYERS = ["models.layers.1.post", "models.layers.3.post"]
D = 64


@torch.no_grad()
def per_layer_explained_variance(sae: TopKTrainingSAE, uri: str) -> dict[str, float]:
    calcs = {h: ExplainedVarianceCalculator() for h in LAYERS}
    sae.eval()
    with TokenLoader(uri, hooks=LAYERS, batch_tokens=4096, drop_last=False, norm_target=D**0.5) as loader:
        for batch in loader:
            x = torch.cat([batch[h] for h in LAYERS], dim=1)
            out = sae.decode(sae.encode(x))
            for i, h in enumerate(LAYERS):
                calcs[h].add_batch(out[:, i * D : (i + 1) * D], batch[h])
    sae.train()
    return {h: c.compute() for h, c in calcs.items()}


def main(workdir: str | Path = "examples-out", steps: int = 600, batch_tokens: int = 1024) -> dict[str, float]:
    train, heldout = tiny_vault(workdir)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=2 * D, d_sae=1024, k=16))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_tokens, train_batch_size_samples=batch_tokens, lr=2e-3, lr_end=2e-3
    )
    # Each layer to mean norm sqrt(d) from its statistics: the provider normalises, no scaler needed.
    with VaultProvider(train, LAYERS, batch_tokens=batch_tokens, concat=True, norm_target=D**0.5) as provider:
        first = per_layer_explained_variance(sae, heldout)
        SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
    held = per_layer_explained_variance(sae, heldout)
    return {**{f"{h} at start": v for h, v in first.items()}, **held}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="examples-out")
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    print(main(args.workdir, args.steps))
