"""A crosscoder across two layers: one dictionary whose latents read and write layers 1 and 3.

An acausal crosscoder's encoder sees both layers and each latent decodes into both, which is a
SAELens TopK SAE over the two layers' states side by side. `VaultProvider(concat=True)` gives
those `[tokens, 64 + 64]` batches, each layer scaled to mean norm sqrt(64) from its own exact
statistics so that neither dominates the loss; the held-out explained variance is per layer.

`--two-models`: the crosscoder reads layer 3 of two models instead, a second tiny Llama (other
weights, the same tokenizer) collected with `data_config.align_to` the first one's runs, so both
runs hold the same tokens file for file; `AlignedLoader` reads them side by side.
    python examples/crosscoder_saelens.py [--steps 600] [--workdir examples-out] [--two-models]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from tiny_vault import tiny_vault

from activault import TokenLoader, collect
from activault.config import parse_config
from activault.integrations.saelens import VaultProvider
from activault.integrations.shared import run_statistics
from activault.reading.aligned import AlignedLoader
from activault.tools.tiny import build_model

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


PAIR_HOOK = "models.layers.3.post"


def aligned_vault(workdir: str | Path) -> dict[str, tuple[str, str]]:
    """{split: (first model's run, second model's run)}: the second collected aligned to the first."""
    train, heldout = tiny_vault(workdir)
    work = Path(workdir).absolute()
    second = work / "tiny-llama-b"
    if not (second / "config.json").exists():  # other weights, the first model's tokenizer files
        second.mkdir(parents=True, exist_ok=True)
        for f in (work / "tiny-llama").iterdir():  # tokenizer files and chat template, not the model's
            if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json"):
                (second / f.name).write_bytes(f.read_bytes())
        build_model(second, "llama", seed=1, vocab_size=512, layers=4, d=D)
    first = {"train": train, "heldout": heldout}
    for name, ref in first.items():
        # The keys a config must hold, as the reference has them; align_to supplies the rest.
        stored = json.loads((Path(ref) / "cfg.json").read_text())["config"]
        data = {k: stored["data_config"][k] for k in ("data_key", "n_batches", "seq_length", "batch_size")}
        cfg = parse_config(
            {
                "run_name": f"{name}-b",
                "storage": str(work / "vault"),
                "transformer_config": {"model_name": str(second), "dtype": "float32", "device": "cpu"},
                "data_config": {**data, "align_to": ref},
                "upload_config": {
                    "batches_per_upload": stored["upload_config"]["batches_per_upload"],
                    "hooks": [PAIR_HOOK],
                },
            }
        )
        collect(cfg, show_progress=False)
    return {name: (ref, str(work / "vault" / f"{name}-b")) for name, ref in first.items()}


def pair_batches(runs: tuple[str, str], batch_tokens: int, epochs: int | None = None):
    """`[batch_tokens, 2 * D]`: the two models' layer-3 states of the same tokens, side by side, each
    scaled to mean norm sqrt(D) by its run's own statistics; `epochs` None: without end."""
    scale = [D**0.5 / run_statistics(r, PAIR_HOOK).mean_norm for r in runs]
    epoch = 0
    while epochs is None or epoch < epochs:
        with AlignedLoader(list(runs), [PAIR_HOOK], batch_tokens=batch_tokens, shuffle=True, seed=epoch) as loader:
            for batch in loader:
                yield torch.cat([batch[r][PAIR_HOOK].float() * s for r, s in zip(runs, scale, strict=True)], dim=1)
        epoch += 1


@torch.no_grad()
def per_model_explained_variance(sae: TopKTrainingSAE, runs: tuple[str, str]) -> dict[str, float]:
    calcs = [ExplainedVarianceCalculator() for _ in runs]
    sae.eval()
    for x in pair_batches(runs, 4096, epochs=1):
        out = sae.decode(sae.encode(x))
        for i, c in enumerate(calcs):
            c.add_batch(out[:, i * D : (i + 1) * D], x[:, i * D : (i + 1) * D])
    sae.train()
    return {f"model {i}": c.compute() for i, c in enumerate(calcs)}


def main_two_models(
    workdir: str | Path = "examples-out", steps: int = 600, batch_tokens: int = 1024
) -> dict[str, float]:
    """A crosscoder across the same layer of two models aligned by `data_config.align_to`."""
    runs = aligned_vault(workdir)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=2 * D, d_sae=1024, k=16))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_tokens, train_batch_size_samples=batch_tokens, lr=2e-3, lr_end=2e-3
    )
    first = per_model_explained_variance(sae, runs["heldout"])
    SAETrainer(cfg=cfg, sae=sae, data_provider=pair_batches(runs["train"], batch_tokens)).fit()
    held = per_model_explained_variance(sae, runs["heldout"])
    return {**{f"{m} at start": v for m, v in first.items()}, **held}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="examples-out")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--two-models", action="store_true", help="layer 3 of two aligned models")
    args = p.parse_args()
    print((main_two_models if args.two_models else main)(args.workdir, args.steps))
