"""SAELens from a vault: endless data providers, the exact norm scaling factor, held-out metrics.

```python
from activault.integrations.saelens import VaultProvider, set_scaling_factor

provider = VaultProvider("./vault/run", "models.layers.6.post", batch_tokens=4096)
trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
set_scaling_factor(trainer, "./vault/run", "models.layers.6.post")  # no estimation pass
trainer.fit()
```

`set_scaling_factor` also fills the SAE's empty metadata from the run's cfg.json (`fill_metadata`:
model name, context size, and the hook's TransformerLens name where `transformer_lens_name` knows
it), so the saved SAE names where it applies.

`SAETrainer` calls `next()` on its provider forever: `VaultProvider` runs the loader's epochs one
after another, each reshuffled, and `state_dict()` says exactly where it is
(`SAETrainer(..., save_checkpoint_fn=provider.save_to)` puts it in each checkpoint;
`provider.load_from(checkpoint)` resumes at the next batch).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.integrations.shared import (
    ReadOptions,
    Source,
    Store,
    check_state,
    loader_options,
    open_store,
    read_run,
    run_statistics,
)

Hooks = str | Sequence[str] | Mapping[str, tuple[str, str]]
STATE_FILE = "activault_provider.json"  # in a SAELens checkpoint folder


def _parse_hooks(hooks: Hooks) -> tuple[list[str], str]:
    """(the distinct hooks to read, the output kind: tensor, dict or pairs)."""
    if isinstance(hooks, str):
        return [hooks], "tensor"
    if isinstance(hooks, Mapping):
        if not hooks:
            raise ConfigError("no transcoder pairs given: pass {name: (input_hook, output_hook)}")
        read: list[str] = []
        for name, pair in hooks.items():
            if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(h, str) for h in pair)):
                raise ConfigError(f"transcoder {name!r}: expected (input_hook, output_hook), got {pair!r}")
            read += [h for h in pair if h not in read]
        return read, "pairs"
    names = list(hooks)
    if not names or not all(isinstance(h, str) for h in names):
        raise ConfigError(f"hooks must be a hook name, a list of them or {{name: (in, out)}}, got {hooks!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"hooks listed twice: {sorted({h for h in names if names.count(h) > 1})}")
    return names, "dict"


class VaultProvider(Iterator[Any]):
    """Endless token batches of a stored run, for SAELens's `data_provider`.

    What `next()` returns depends on `hooks`:
    - one hook name: `[batch_tokens, d]` (`SAETrainer`);
    - a list of hooks: `{hook: [batch_tokens, d]}`, the same tokens in each (`MultiSAETrainer`),
      or with `concat=True` one `[batch_tokens, sum of d]` (a crosscoder over those hooks);
    - `{name: (input_hook, output_hook)}`: `{name: (x [batch_tokens, d_in], y [batch_tokens, d_out])}`,
      aligned token for token (transcoders).

    Args:
        uri: the run folder (`PATH/RUN`, `s3://BUCKET/RUN`), a Store, or a list of runs.
        rank, world_size: disjoint files per DDP rank; default torch.distributed's, if initialised.
        dtype: delivered dtype (SAELens SAEs default to float32).
        Other options as `TokenLoader` (window, seed, drop_positions_below, center, norm_target, ...,
        `options=ReadOptions(...)`), checked here: an unknown name is a ConfigError listing them.
    """

    def __init__(
        self,
        uri: Source | Sequence[Source],
        hooks: Hooks,
        *,
        batch_tokens: int,
        concat: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype | None = torch.float32,
        options: ReadOptions | None = None,
        **kwargs: Any,
    ):
        from activault import TokenLoader

        fixed = ("loop", "hooks", "batch_tokens", "dtype")
        read, rest = loader_options(VaultProvider.__init__, fixed, options, kwargs, rank, world_size)
        self.uri = uri
        self.read, self.kind = _parse_hooks(hooks)
        self.pairs = dict(hooks) if isinstance(hooks, Mapping) else {}
        if concat and self.kind != "dict":
            raise ConfigError("concat=True needs a list of hooks (their states are concatenated per token)")
        self.concat = concat
        self.rank, self.world_size = read.rank, read.world_size
        self.loader = TokenLoader(
            uri, loop=True, hooks=self.read, batch_tokens=batch_tokens, dtype=dtype, options=read, **rest
        )
        self._it: Iterator[Any] | None = None
        self.batches = 0  # delivered since construction or the last load_state_dict

    @property
    def hook(self) -> str | None:
        """The hook, when the provider reads exactly one."""
        return self.read[0] if self.kind == "tensor" else None

    def __iter__(self) -> VaultProvider:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self.loader)
        batch: dict[str, torch.Tensor] = next(self._it)
        self.batches += 1
        if self.kind == "tensor":
            return batch[self.read[0]]
        if self.kind == "pairs":
            return {name: (batch[a], batch[b]) for name, (a, b) in self.pairs.items()}
        if self.concat:
            return torch.cat([batch[h] for h in self.read], dim=1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: resuming from it yields the batch after the last one delivered."""
        return {
            "loader": self.loader.state_dict(),
            "hooks": list(self.read),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` was saved; a field that does not fit is a ConfigError naming it."""
        state = check_state(state, "VaultProvider", {"rank": (0, None), "world_size": (1, None)})
        if not isinstance(state.get("loader"), dict):
            raise ConfigError(
                f"VaultProvider state: field 'loader' is {state.get('loader')!r}, not a loader state_dict"
            )
        for key, mine in (
            ("hooks", self.read),
            ("rank", self.rank),
            ("world_size", self.world_size),
        ):
            if state.get(key) != mine:
                raise ConfigError(f"state was saved with {key}={state.get(key)!r}, this provider has {mine!r}")
        self.loader.load_state_dict(state["loader"])  # checked there before anything changes
        self._close_stream()
        self.batches = 0

    def save_to(self, checkpoint_path: str | Path | None) -> None:
        """Write `state_dict()` into a SAELens checkpoint folder.

        Pass it as `SAETrainer(..., save_checkpoint_fn=provider.save_to)`: each checkpoint then
        holds the provider's position next to the trainer's state; `load_from` resumes from it.
        """
        if checkpoint_path is not None:
            (Path(checkpoint_path) / STATE_FILE).write_text(json.dumps(self.state_dict()) + "\n")

    def load_from(self, checkpoint_path: str | Path) -> None:
        """Resume at the position saved in a checkpoint folder by `save_to`."""
        path = Path(checkpoint_path) / STATE_FILE
        if not path.is_file():
            raise NotFoundError(f"{path} does not exist: was the trainer given save_checkpoint_fn=provider.save_to?")
        try:
            state = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError
            raise FormatError(f"{path} is not valid JSON ({str(e)[:80]}): save the checkpoint again") from None
        try:
            self.load_state_dict(state)
        except ConfigError as e:
            raise FormatError(f"{path}: {e}") from None

    def _close_stream(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None

    def close(self) -> None:
        """Stop reading ahead now (also on leaving `with`)."""
        self._close_stream()
        self.loader.finalize()

    def __enter__(self) -> VaultProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scaling_factor(uri: Source | Sequence[Source], hook: str) -> float:
    """SAELens's `expected_average_only_in` factor, `sqrt(d_in) / mean token norm`, from exact statistics.

    SAELens estimates the mean norm from `n_batches_for_norm_estimate` batches; `statistics.json`
    holds it over every finite stored token (float64, merged over machines), so nothing is read.
    Statistics that counted tokens with NaN or Inf in (before stats_version 2) are a DataError
    naming the fix.
    """
    stats = run_statistics(uri, hook, normalise=True)
    if stats.mean_norm <= 0:
        raise ConfigError(f"the mean norm of {hook!r} is {stats.mean_norm}: its activations are all zero")
    return math.sqrt(stats.d) / stats.mean_norm


def set_scaling_factor(trainer: Any, uri: Source | Sequence[Source] | VaultProvider, hook: str | None = None) -> None:
    """Set a trainer's norm scaling factor from the run's statistics, so `fit()` skips its estimate.

    `trainer` is an `SAETrainer` (the hook defaults to the provider's, when `uri` is a
    one-hook `VaultProvider`) or a `MultiSAETrainer` (each SAE gets its own hook's factor).
    `fit()` folds the factor into the SAE's weights at the end, as it does with its estimate.
    """
    if isinstance(uri, VaultProvider):
        hook = hook or uri.hook
        uri = uri.uri
    per_sae = getattr(trainer, "trainers", None)
    if per_sae is not None:  # MultiSAETrainer: one SAETrainer per SAE, hooks in `hook_names`
        for name, sub in per_sae.items():
            _set_one(sub, uri, trainer.hook_names[name])
        return
    if hook is None:
        raise ConfigError("which hook's statistics? pass hook=, or a VaultProvider of one hook")
    _set_one(trainer, uri, hook)


def _set_one(trainer: Any, uri: Source | Sequence[Source], hook: str) -> None:
    d_in = int(trainer.sae.cfg.d_in)
    stats_d = run_statistics(uri, hook, normalise=True).d
    if d_in != stats_d:
        raise ConfigError(f"the SAE has d_in={d_in} but hook {hook!r} is {stats_d} wide: wrong hook?")
    trainer.activation_scaler.scaling_factor = scaling_factor(uri, hook)
    fill_metadata(trainer.sae, uri, hook)


# activault's block hooks -> TransformerLens's, per model_type, where HookedTransformer (loaded
# without weight processing, as SAELens loads it) computes the same values there. Pre-norm decoders
# add attention and MLP outputs to the residual stream; BERT normalises after each addition, so a
# block's output is TransformerLens's `hook_normalized_resid_post` (HookedEncoder, bidirectional).
# Each entry is checked against TransformerLens in tests/integrations/test_saelens.py: gpt2 and
# llama on tiny models, bert on the real all-MiniLM-L6-v2 weights.
_DECODER = {
    "pre": "hook_resid_pre",
    "post": "hook_resid_post",
    "attn.post": "hook_attn_out",
    "mlp.post": "hook_mlp_out",
}
TRANSFORMER_LENS_HOOKS: dict[str, dict[str, str]] = {
    **{t: _DECODER for t in ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma")},
    # Gemma 2 and 3 normalise attention and MLP outputs after the module activault hooks.
    **{t: {"pre": "hook_resid_pre", "post": "hook_resid_post"} for t in ("gemma2", "gemma3", "gemma3_text")},
    "bert": {"pre": "hook_resid_pre", "post": "hook_normalized_resid_post", "mlp.post": "hook_mlp_out"},
}
_BLOCK_HOOK = re.compile(r"^models\.layers\.(-?\d+)(?:\.(self_attn|attn|attention|mlp))?\.(pre|post)$")


def transformer_lens_name(hook: str, model_type: str, n_layers: int | None = None) -> str | None:
    """TransformerLens's name of an activault hook (`models.layers.3.post` -> `blocks.3.hook_resid_post`
    for a llama), or None where its values would differ or the architecture is not in the table.

    Args:
        n_layers: the model's blocks, to resolve a negative index (`models.layers.-1.post`).
    """
    m = _BLOCK_HOOK.match(hook)
    table = TRANSFORMER_LENS_HOOKS.get(model_type, {})
    if m is None or not table:
        return None
    i = int(m.group(1))
    if i < 0:
        if n_layers is None or i + n_layers < 0:
            return None
        i += n_layers
    part = {None: "", "mlp": "mlp."}.get(m.group(2), "attn.")
    kind = part + m.group(3)
    name = table.get(kind)
    return f"blocks.{i}.{name}" if name else None


def sae_metadata(uri: Source | Sequence[Source] | VaultProvider, hook: str | None = None) -> dict[str, Any]:
    """SAELens metadata of an SAE trained on `hook` of a run, from its cfg.json: `model_name`,
    `context_size`, `hook_name` (TransformerLens's name where known, else the activault hook), and
    `activault_hook`. A list of runs: the first run's (they hold the same hook)."""
    if isinstance(uri, VaultProvider):
        hook, uri = hook or uri.hook, uri.uri
    if hook is None:
        raise ConfigError("which hook? pass hook=, or a VaultProvider of one hook")
    src = uri if isinstance(uri, str | Path | Store) else next(iter(uri))
    store = src if isinstance(src, Store) else open_store(src)
    record = read_run(store, "", original_ok=True)
    if record is None:
        raise NotFoundError(f"{store.url('cfg.json')} does not exist: pass the run's folder (PATH/RUN)")
    model = record.model
    data = record.config.get("data_config") or {}
    out: dict[str, Any] = {"activault_hook": hook, "hook_name": hook}
    if model.get("name") and model["name"] != "unknown":
        out["model_name"] = model["name"]
    if isinstance(data.get("seq_length"), int):
        out["context_size"] = data["seq_length"]
    tl = transformer_lens_name(hook, str(model.get("model_type", "")), model.get("n_layers"))
    if tl is not None:
        out["hook_name"] = tl
    return out


def run_metadata(uri: Source | Sequence[Source], hook: str) -> dict[str, Any]:
    """`sae_metadata` for the configs other libraries save; a run without cfg.json (a hook folder
    read alone) gives only the hook's name: an SAE trains without it, so its absence is no error."""
    try:
        return sae_metadata(uri, hook)
    except NotFoundError:
        return {"activault_hook": hook, "hook_name": hook}


def fill_metadata(sae: Any, uri: Source | Sequence[Source] | VaultProvider, hook: str | None = None) -> dict[str, Any]:
    """Set the SAELens SAE's metadata fields that are still empty from `sae_metadata`; returns them.

    A field the user set is kept, so a hook name given by hand wins.
    """
    meta = sae.cfg.metadata
    found = sae_metadata(uri, hook)
    filled = {k: v for k, v in found.items() if meta.get(k) is None}
    for k, v in filled.items():
        meta[k] = v
    return filled


@torch.no_grad()
def evaluate(sae: Any, batches: Iterable[torch.Tensor], scaler: Any = None) -> dict[str, float]:
    """Explained variance and L0 of a SAELens SAE on batches `[tokens, d]`, with SAELens's own code.

    The explained variance is SAELens's `ExplainedVarianceCalculator` (streamed, float64), L0 is
    counted as its `get_sparsity_and_variance_metrics` counts it (non-zero latents per token).
    For held-out tokens, pass one epoch of a `TokenLoader` over a run the SAE never saw.
    `scaler`: the trainer's `activation_scaler` while it is still unfolded (before `fit()` ends).
    """
    from sae_lens.evals import ExplainedVarianceCalculator

    calc = ExplainedVarianceCalculator()
    l0_sum, tokens = 0.0, 0
    was_training = sae.training
    sae.eval()
    try:
        for x in batches:
            x = x.to(sae.device, sae.dtype)
            x_in = scaler.scale(x) if scaler is not None else x
            feats = sae.encode(x_in)
            out = sae.decode(feats)
            if scaler is not None:
                out = scaler.unscale(out)
            if feats.is_sparse:
                feats = feats.to_dense()
            calc.add_batch(out, x)
            l0_sum += float((feats != 0).sum())
            tokens += x.shape[0]
    finally:
        sae.train(was_training)
    if tokens == 0:
        raise ConfigError("no batches to evaluate on: the held-out loader yielded nothing")
    return {"explained_variance": calc.compute(), "l0": l0_sum / tokens, "tokens": float(tokens)}
