"""EleutherAI sparsify from a vault: a replay model and a token dataset for its `Trainer`.

sparsify's `Trainer` only trains from a live model: it registers forward hooks on the model's
modules and runs the model over batches of `input_ids`. There is no entry point for stored
activations, so this module gives it the nearest thing: a model whose hooked modules *replay* the
stored activations of exactly the tokens the dataset handed out. sparsify's own training loop then
runs unchanged (initialisation, optimizers, dead-latent tracking, checkpoints, `exclude_tokens`).

```python
from sparsify import SaeConfig, TrainConfig, Trainer
from activault.integrations.sparsify import replay, save_metadata

model, dataset = replay("./vault/run", ["models.layers.6.post"], num_tokens=2_000_000)
cfg = TrainConfig(SaeConfig(k=32), batch_size=16, hookpoints=model.hookpoints, log_to_wandb=False)
trainer = Trainer(cfg, dataset, model)
trainer.fit()
save_metadata(trainer, model)  # the run's model and hook names into each saved coder's cfg.json
```

Transcoders: `replay(uri, {"models.layers.6.mlp": ("models.layers.6.mlp.pre", "models.layers.6.mlp.post")})`
and `TranscoderConfig(...)`: the module named by the key receives the input hook's states and
returns the output hook's. Only `loss_fn="fvu"` (the default) works: a vault holds no logits.
"""

from __future__ import annotations

import glob
import json
import os
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from activault.errors import ActivaultError, ConfigError
from activault.integrations.saelens import run_metadata
from activault.integrations.shared import ReadOptions, Source, check_state, loader_options, whole

Row = tuple[torch.Tensor, dict[str, torch.Tensor]]  # ids [seq], {hook: states [seq, d]}


class _Point(nn.Module):
    """A hooked module that 'computes' stored activations: input `x`, output `y` (or `x` for an SAE)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x if y is None else y


class VaultReplay(nn.Module):
    """The model sparsify's `Trainer` hooks: each hookpoint replays the stored states of the rows
    the paired `VaultTokens` handed out, in order, and checks their token ids."""

    def __init__(
        self,
        points: Mapping[str, tuple[str, str | None]],
        dims: Mapping[str, int],
        rows: deque[Row],
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.points = dict(points)
        self.dims = dict(dims)
        self._rows = rows
        self._device = torch.device(device)
        self.metadata: dict[str, dict[str, Any]] = {}  # hookpoint -> the run's metadata (replay fills it)
        for name in self.points:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                child = parent._modules.get(part)
                if child is None:
                    child = nn.Module()
                    parent.add_module(part, child)
                elif isinstance(child, _Point):
                    raise ConfigError(f"hookpoint {name!r} lies under hookpoint {part!r}: rename one of them")
                parent = child
            if leaf in parent._modules:
                raise ConfigError(f"hookpoint {name!r} is given twice or has hookpoints under it")
            parent.add_module(leaf, _Point())

    @property
    def hookpoints(self) -> list[str]:
        """The names to pass as `TrainConfig(hookpoints=...)`."""
        return list(self.points)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def base_model(self) -> VaultReplay:
        return self

    @property
    def dummy_inputs(self) -> dict[str, Any]:
        # sparsify runs the model once on these to learn each hookpoint's width.
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "dummy": True}

    def forward(self, input_ids: torch.Tensor, dummy: bool = False) -> None:
        """Run each hookpoint on the states of these rows: `input_ids [rows, seq]`."""
        if dummy:
            states = {h: torch.zeros(1, 1, d, device=self._device) for h, d in self.dims.items()}
        else:
            states = self._take(input_ids)
        for name, (src, dst) in self.points.items():
            point = self.get_submodule(name)
            point(states[src]) if dst is None else point(states[src], states[dst])

    def _take(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        n = input_ids.shape[0]
        if len(self._rows) < n:
            raise ActivaultError(
                f"the replay model was asked for {n} rows but the dataset handed out {len(self._rows)}: "
                "pass the dataset from the same replay() call, unshuffled (sparsify's DataLoader does not shuffle)"
            )
        rows = [self._rows.popleft() for _ in range(n)]
        ids = torch.stack([r[0] for r in rows])
        if not torch.equal(ids, input_ids.to(ids.device, ids.dtype)):
            raise ActivaultError("the token ids given to the replay model are not the ones the dataset handed out")
        return {h: torch.stack([r[1][h] for r in rows]).to(self._device) for h in self.dims}


class VaultTokens(Dataset):
    """Rows of `tokens_per_row` stored tokens (shuffled across files), read in order.

    Item `i` is `{"input_ids": [tokens_per_row]}`; fetching it queues the row's states for the
    replay model. Rows follow an endless, reshuffled-per-epoch stream, so any `num_tokens` works.
    `select(range(n, len))`, which sparsify calls when resuming, moves to row `n`: instantly
    after `load_state_dict`, else by reading forward.
    """

    def __init__(self, batches: Any, loader: Any, length: int, tokens_per_row: int, rows: deque[Row]):
        self._batches, self.loader = batches, loader
        self.length, self.tokens_per_row = length, tokens_per_row
        self._rows = rows
        self._chunk: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._chunk_state: dict[str, Any] = loader.state_dict()
        self._in_chunk = 0  # rows of the current chunk handed out
        self._skip = 0  # rows of the next chunk to skip (after load_state_dict)
        self.position = 0  # rows handed out

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < self.position:
            raise ActivaultError(f"row {index} was already read (next is {self.position}): rows are read in order only")
        while self.position < index:  # resuming without a saved state: read forward
            self._next_row()
            self._rows.pop()
        return {"input_ids": self._next_row()[0]}

    def _next_row(self) -> Row:
        if self._chunk is None or self._in_chunk == self._chunk[0].shape[0]:
            self._chunk_state = self.loader.state_dict()
            batch = next(self._batches)
            S = self.tokens_per_row
            ids = batch["input_ids"].view(-1, S)
            self._chunk = ids, {h: s.view(ids.shape[0], S, -1) for h, s in batch["states"].items()}
            self._in_chunk, self._skip = self._skip, 0
        ids_all, states_all = self._chunk
        i = self._in_chunk
        row = (ids_all[i], {h: s[i] for h, s in states_all.items()})
        self._in_chunk += 1
        self.position += 1
        self._rows.append(row)
        return row

    def select(self, rows: range) -> Dataset:
        """Rows `rows.start` on (sparsify resumes with `select(range(step * batch_size, len))`)."""
        if rows.step != 1 or rows.stop > self.length:
            raise ConfigError(f"select({rows}) is not a contiguous range of this dataset's {self.length} rows")
        return _From(self, rows.start, len(rows))

    def state_dict(self) -> dict[str, Any]:
        """Exact position: the loader's state before the current chunk and the rows read from it."""
        return {
            "loader": self._chunk_state,
            "in_chunk": self._in_chunk,
            "position": self.position,
            "tokens_per_row": self.tokens_per_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` (from `state_dict()` of a dataset of the same replay() options) was
        saved; a field out of its bounds is a ConfigError naming it, and nothing changes."""
        per_chunk = self.loader.batch_tokens // self.tokens_per_row  # rows of a loader batch
        bounds = {"in_chunk": (0, per_chunk), "position": (0, None), "tokens_per_row": (1, None)}
        state = check_state(state, "VaultTokens", bounds)
        if state["tokens_per_row"] != self.tokens_per_row:
            raise ConfigError(
                f"state was saved with tokens_per_row={state['tokens_per_row']}, not {self.tokens_per_row}"
            )
        if "loader" not in state or not isinstance(state["loader"], dict):
            raise ConfigError(f"VaultTokens state: field 'loader' is {state.get('loader')!r}, not a loader state_dict")
        self.loader.load_state_dict(state["loader"])  # checked there before this dataset changes
        self._batches.close()
        self._batches = iter(self.loader)
        self._chunk, self._chunk_state = None, dict(state["loader"])
        self._in_chunk = self._skip = int(state["in_chunk"])
        self.position = int(state["position"])
        self._rows.clear()

    def close(self) -> None:
        self._batches.close()
        self.loader.finalize()


class _From(Dataset):
    """Rows `start, start + 1, ...` of a VaultTokens, indexed from 0."""

    def __init__(self, base: VaultTokens, start: int, length: int):
        self.base, self.start, self.length = base, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.base[self.start + index]


def replay(
    uri: Source | Sequence[Source],
    hookpoints: Sequence[str] | Mapping[str, tuple[str, str]],
    *,
    num_tokens: int,
    tokens_per_row: int = 256,
    rows_per_read: int = 16,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    options: ReadOptions | None = None,
    **kwargs: Any,
) -> tuple[VaultReplay, VaultTokens]:
    """(model, dataset) for `sparsify.Trainer(cfg, dataset, model)`, training on `num_tokens` tokens.

    Args:
        hookpoints: hook names (one SAE each), or `{name: (input_hook, output_hook)}` (transcoders).
        tokens_per_row: tokens per dataset row; sparsify's `batch_size` counts rows, so a step
            trains on `batch_size * tokens_per_row` tokens.
        rows_per_read: rows gathered per loader batch.
        Other options as `TokenLoader` (seed, window, drop_positions_below, ...,
        `options=ReadOptions(...)`), checked here; rank and world_size default to
        torch.distributed's.
    """
    from activault import TokenLoader

    fixed = ("loop", "hooks", "batch_tokens", "return_ids", "dtype")
    read_opts, rest = loader_options(replay, fixed, options, kwargs, rank, world_size)
    tokens_per_row, rows_per_read = whole("tokens_per_row", tokens_per_row), whole("rows_per_read", rows_per_read)

    if isinstance(hookpoints, Mapping):
        points: dict[str, tuple[str, str | None]] = {n: (a, b) for n, (a, b) in hookpoints.items()}
    else:
        points = {h: (h, None) for h in hookpoints}
    if not points:
        raise ConfigError("no hookpoints given")
    read = list(dict.fromkeys(h for pair in points.values() for h in pair if h is not None))
    num_tokens = whole("num_tokens", num_tokens, tokens_per_row, f"a whole number >= tokens_per_row={tokens_per_row}")
    loader = TokenLoader(
        uri,
        loop=True,
        hooks=read,
        batch_tokens=tokens_per_row * rows_per_read,
        return_ids=True,
        dtype=torch.float32,
        options=read_opts,
        **rest,
    )
    dims = {h: shape.d_model for h, shape in zip(read, loader.shapes, strict=True) if shape is not None}
    if len(dims) != len(read):
        raise ConfigError(
            f"cannot tell the width of {read} before reading (legacy .pt files): use a run with metadata.json"
        )
    rows: deque[Row] = deque()
    dataset = VaultTokens(iter(loader), loader, num_tokens // tokens_per_row, tokens_per_row, rows)
    model = VaultReplay(points, dims, rows, device)
    for name, (src, dst) in points.items():
        meta = run_metadata(uri, src)
        if dst is not None:  # a transcoder: what it predicts, named the same ways
            out = run_metadata(uri, dst)
            meta |= {"activault_output_hook": out["activault_hook"], "output_hook_name": out["hook_name"]}
        model.metadata[name] = meta
    return model, dataset


def save_metadata(trainer: Any, model: VaultReplay) -> list[Path]:
    """Add the run's metadata (`saelens.sae_metadata`: model_name, context_size, activault_hook,
    hook_name) to every coder's cfg.json that sparsify saved under the trainer's folder (checkpoints
    and `best/` included); `SparseCoder.load_from_disk` ignores the added keys. Returns the files.

    Args:
        trainer: the sparsify `Trainer` that ran `fit()`, or the folder it saved into
            (`save_dir/run_name`).
    """
    if isinstance(trainer, str | Path):
        root = Path(trainer)
    else:
        root = Path(trainer.cfg.save_dir) / (trainer.cfg.run_name or "unnamed")  # as Trainer.save names it
    written = []
    for name, meta in model.metadata.items():
        for file in sorted(root.glob(f"**/{glob.escape(name)}/cfg.json")):
            config = json.loads(file.read_text())
            tmp = file.with_name(f".{file.name}.tmp")  # renamed over it: never half written
            tmp.write_text(json.dumps({**config, **meta}))
            os.replace(tmp, file)
            written.append(file)
    if not written:
        raise ConfigError(
            f"no saved coder of {model.hookpoints} under {root}: call save_metadata after trainer.fit(), "
            "or pass the folder sparsify saved into (save_dir/run_name)"
        )
    return written
