"""Collect -> train a SAELens TopK SAE from the vault -> evaluate on held-out tokens.

No glue: `VaultProvider` is SAELens's `data_provider` (endless, reshuffled each epoch), the norm
scaling factor comes from the run's exact statistics (no estimation pass), and the held-out
explained variance and L0 are computed with SAELens's own evaluation code. Last, the saved SAE is
evaluated the library-independent way (`activault evaluate`): with it spliced into the model, how
much of the language-model loss it recovers against zero-ablation.
    python examples/sae_saelens.py [--steps 600] [--workdir examples-out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from tiny_vault import tiny_vault

from activault import TokenLoader
from activault.evaluation import evaluate as evaluate_saved
from activault.integrations.saelens import VaultProvider, evaluate, set_scaling_factor

HOOK = "models.layers.1.post"


def main(workdir: str | Path = "examples-out", steps: int = 600, batch_tokens: int = 1024) -> dict[str, float]:
    train, heldout = tiny_vault(workdir)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=64, d_sae=512, k=8, normalize_activations="expected_average_only_in")
    )
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_tokens, train_batch_size_samples=batch_tokens, lr=2e-3, lr_end=2e-3
    )
    with VaultProvider(train, HOOK, batch_tokens=batch_tokens, seed=0) as provider:
        trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider)
        set_scaling_factor(trainer, provider)  # sqrt(d_in) / exact mean norm; fit() skips its estimate
        first = evaluate(sae, [next(provider)], scaler=trainer.activation_scaler)
        trainer.fit()  # folds the scaling factor into the weights at the end
    with TokenLoader(heldout, hooks=[HOOK], batch_tokens=4096, drop_last=False, dtype=torch.float32) as loader:
        held = evaluate(sae, (batch[HOOK] for batch in loader))
    sae.save_model(Path(workdir) / "sae")  # what `activault evaluate HELDOUT SAE --hook H` reads
    spliced = evaluate_saved(heldout, Path(workdir) / "sae", hook=HOOK)
    assert spliced.lm is not None  # the held-out run's cfg.json names the local tiny model
    return {
        "explained_variance_at_start": first["explained_variance"],
        **held,
        "ce_loss_recovered": spliced.lm.recovered,
        "explained_variance_spliced_eval": spliced.reconstruction.explained_variance,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="examples-out")
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    print(main(args.workdir, args.steps))
