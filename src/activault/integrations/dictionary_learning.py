"""dictionary_learning from a vault: a drop-in for its `ActivationBuffer`, and SAEs saved at raw scale.

`dictionary_learning.training.trainSAE(data, ...)` only iterates `data` for `[batch, d]` tensors;
its `ActivationBuffer` fills that stream by running an nnsight model. `VaultBuffer` fills it from
stored activations instead, endless and resumable; `train` runs trainSAE on it:

```python
from dictionary_learning.trainers import TopKTrainer
from activault.integrations.dictionary_learning import VaultBuffer, train

buffer = VaultBuffer("./vault/run", "models.layers.6.post", out_batch_size=4096, normalize=True)
train(buffer, [{"trainer": TopKTrainer, ...}], steps=10_000, save_dir="saes", device="cpu")
```

`normalize=True` divides batches by the exact norm factor (`buffer.norm_factor`, from
`statistics.json`; trainSAE's `normalize_activations` estimates it from 100 batches). An SAE
trained on them is in normalised units: `train` (or `finish` after your own trainSAE call)
rescales the saved `ae.pt` and checkpoints with the dictionary's `scale_biases`, as trainSAE does
with its estimate, so the saved SAE works on raw activations.
Its `evaluation.evaluate` needs a live nnsight model and has no counterpart here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from activault.errors import ConfigError
from activault.integrations.saelens import run_metadata
from activault.integrations.shared import ReadOptions, Source, check_state, loader_options, run_statistics, whole


class VaultBuffer(Iterator[torch.Tensor]):
    """Endless batches `[out_batch_size, d]` of one hook, shuffled across files, for `trainSAE`.

    Args:
        normalize: divide by `norm_factor` so tokens have unit mean squared norm (the paper's
            convention that trainSAE follows). The factor leaves out tokens with NaN or Inf
            (`drop_nonfinite=True` drops the tokens too); statistics that counted them in
            (before stats_version 2) are a DataError naming the fix.
        Other options as `TokenLoader` (seed, window, drop_positions_below, ...,
        `options=ReadOptions(...)`), checked here; rank and world_size default to
        torch.distributed's.
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        hook: str,
        *,
        out_batch_size: int = 8192,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        normalize: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        options: ReadOptions | None = None,
        **kwargs: Any,
    ):
        from activault import TokenLoader

        fixed = ("loop", "hooks", "batch_tokens", "dtype", "device", "norm_target")
        read, rest = loader_options(VaultBuffer.__init__, fixed, options, kwargs, rank, world_size)
        out_batch_size = whole("out_batch_size", out_batch_size)
        self.uri, self.hook, self.out_batch_size, self.device = uri, hook, out_batch_size, str(device)
        stats = run_statistics(uri, hook, normalise=normalize)
        self.d_submodule = stats.d
        # sqrt(E ||x||^2) over every finite stored token: trainSAE's `get_norm_factor`, exactly
        # (NaN when the statistics counted NaN in: refused above when normalising).
        self.norm_factor = math.sqrt(float(stats.norm_sq_sum) / max(stats.count, 1))
        self.normalize = normalize
        # Saved by trainSAE in each trainer's config.json: which model and hook the SAE applies to.
        self.metadata = run_metadata(uri, hook)
        self.loader = TokenLoader(
            uri,
            loop=True,
            hooks=[hook],
            batch_tokens=out_batch_size,
            dtype=dtype,
            device=device,
            norm_target=stats.mean_norm / self.norm_factor if normalize else None,
            options=read,
            **rest,
        )
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> VaultBuffer:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)[self.hook]

    @property
    def config(self) -> dict[str, Any]:
        """What trainSAE saves next to each trainer's config (as ActivationBuffer.config), with the
        run's metadata (`saelens.sae_metadata`: model_name, context_size, activault_hook and
        hook_name, TransformerLens's name where known)."""
        return {
            **self.metadata,
            "source": str(self.uri),
            "hook": self.hook,
            "d_submodule": self.d_submodule,
            "out_batch_size": self.out_batch_size,
            "device": self.device,
            "normalize": self.normalize,
            "norm_factor": self.norm_factor,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "hook": self.hook}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` was saved; a field that does not fit is a ConfigError naming it."""
        state = check_state(state, "VaultBuffer", {})
        if state.get("hook") != self.hook:
            raise ConfigError(f"state was saved with hook={state.get('hook')!r}, this buffer has {self.hook!r}")
        if not isinstance(state.get("loader"), dict):
            raise ConfigError(f"VaultBuffer state: field 'loader' is {state.get('loader')!r}, not a loader state_dict")
        self.loader.load_state_dict(state["loader"])  # checked there before anything changes
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None
        self.loader.finalize()

    def __enter__(self) -> VaultBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RESCALED = "activault_rescaled_by"  # config.json key: the factor the saved SAEs were scaled by


def train(
    buffer: VaultBuffer,
    trainer_configs: Sequence[dict[str, Any]],
    steps: int,
    save_dir: str | Path,
    **kwargs: Any,
) -> list[Path]:
    """trainSAE on `buffer`; every trainer's saved SAE works on raw activations (`finish`).

    Other keyword arguments go to trainSAE. Returns the trainers' folders (`save_dir/trainer_{i}`).
    """
    from dictionary_learning.training import trainSAE

    if "normalize_activations" in kwargs or "data" in kwargs:
        raise ConfigError(
            "train() feeds trainSAE from the buffer and normalises with its exact factor: drop "
            "normalize_activations= / data= and pass VaultBuffer(..., normalize=True)"
        )
    configs = [dict(c) for c in trainer_configs]  # trainSAE deletes their "trainer" key
    trainSAE(data=buffer, trainer_configs=configs, steps=steps, save_dir=str(save_dir), **kwargs)
    return [finish(Path(save_dir) / f"trainer_{i}", buffer) for i in range(len(configs))]


def finish(trainer_dir: str | Path, buffer: VaultBuffer | float) -> Path:
    """Rescale a trainer's saved SAE (`ae.pt`, `checkpoints/ae_*.pt`) from normalised to raw units.

    Args:
        trainer_dir: a folder trainSAE wrote (`save_dir/trainer_{i}`: ae.pt and config.json).
        buffer: the VaultBuffer it trained on (its factor if it normalised, else 1), or the factor.
    Done once: config.json records the factor, and finishing again with it changes nothing.
    """
    from dictionary_learning.utils import load_dictionary

    folder = Path(trainer_dir)
    factor = float(buffer if not isinstance(buffer, VaultBuffer) else buffer.norm_factor if buffer.normalize else 1.0)
    if not math.isfinite(factor) or factor <= 0:
        raise ConfigError(f"norm factor {factor!r} is not a positive number: pass the buffer the SAE trained on")
    config_file = folder / "config.json"
    if not (folder / "ae.pt").is_file() or not config_file.is_file():
        raise ConfigError(
            f"{folder} holds no ae.pt and config.json: pass a trainer folder trainSAE wrote (save_dir/trainer_0)"
        )
    config = json.loads(config_file.read_text())
    done = config.get(RESCALED)
    if done is not None:
        if done == factor:
            return folder
        raise ConfigError(
            f"{folder}'s SAE was already rescaled by {done} ({config_file} field {RESCALED!r}); this buffer's "
            f"factor is {factor}: it is at raw scale already, use it as it is"
        )
    files = [folder / "ae.pt", *sorted((folder / "checkpoints").glob("ae_*.pt"))]
    if factor != 1.0:
        ae, _ = load_dictionary(str(folder), device="cpu")  # the dictionary class the library itself loads
        for file in files:
            # The normalised weights are kept until config.json records the factor: a finish killed
            # midway, run again, scales each file from them once, never twice.
            source = file.with_name(f".{file.name}.normalised")
            if not source.exists():
                _replace(source, lambda tmp, file=file: tmp.write_bytes(file.read_bytes()))
            ae.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
            ae.scale_biases(factor)
            _replace(file, lambda tmp: torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, tmp))
    config[RESCALED] = factor
    _replace(config_file, lambda tmp: tmp.write_text(json.dumps(config, indent=4)))
    for file in files:
        file.with_name(f".{file.name}.normalised").unlink(missing_ok=True)
    return folder


def _replace(file: Path, write: Any) -> None:
    """Write `file` under a temporary name, then rename it over the old one (never half written)."""
    tmp = file.with_name(f".{file.name}.tmp")
    write(tmp)
    os.replace(tmp, file)
