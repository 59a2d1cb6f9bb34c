"""dictionary_learning from a vault: a drop-in for its `ActivationBuffer`.

`dictionary_learning.training.trainSAE(data, ...)` only iterates `data` for `[batch, d]` tensors;
its `ActivationBuffer` fills that stream by running an nnsight model. `VaultBuffer` fills it from
stored activations instead, endless and resumable:

```python
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from activault.integrations.dictionary_learning import VaultBuffer

buffer = VaultBuffer("./vault/run", "models.layers.6.post", out_batch_size=4096)
trainSAE(data=buffer, trainer_configs=[{"trainer": TopKTrainer, ...}], steps=10_000, device="cpu")
```

`trainSAE(normalize_activations=True)` estimates its norm factor from 100 batches; the exact one
is `buffer.norm_factor` (from `statistics.json`). To use it, pass `normalize=True` here (batches
come divided by it), keep `normalize_activations=False`, and after training call
`trainer.ae.scale_biases(buffer.norm_factor)`, which is what trainSAE does with its estimate.
Its `evaluation.evaluate` needs a live nnsight model and has no counterpart here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from activault.errors import ConfigError
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
        """What trainSAE saves next to each trainer's config (as ActivationBuffer.config)."""
        return {
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
