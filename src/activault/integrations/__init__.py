"""Training on a vault with the libraries researchers already use; none of them is a dependency.

Each module imports its library only when called (`pip install activault[integrations]`):

- `saelens`: endless, resumable data providers for SAELens's `SAETrainer` / `MultiSAETrainer`,
  the exact norm scaling factor from `statistics.json`, held-out evaluation.
- `sparsify`: a replay model and dataset so EleutherAI sparsify's `Trainer` (which hooks a live
  model) trains SAEs and transcoders from stored activations.
- `dictionary_learning`: a drop-in for its `ActivationBuffer`, for `trainSAE`.
- `saelens_cache`: `export_saelens` / `import_saelens` between a run and SAELens's cached
  activations (an HF `datasets` folder, as `CacheActivationsRunner` writes it).
"""

__all__ = ["dictionary_learning", "saelens", "saelens_cache", "sparsify"]
