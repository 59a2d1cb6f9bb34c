"""The language-model loss with a function spliced in at a hook, over a run's stored rows.

The stored rows are run as they were collected: each row's documents are separate segments (the
same packed attention mask as collection), a document's first piece at its own positions, a piece
continued from the previous row at positions restarting at 0. Tokens that cleaning dropped (BOS,
chat specials) are not stored, so the model runs without them; only consecutive stored tokens of
one document are predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from activault.collection.hooks import HookPoint, attention_inputs, resolve_hooks
from activault.errors import ConfigError
from activault.reading.splits import Split
from activault.storage import Store
from activault.vault.megabatch import decode
from activault.vault.records import parse_file_name

IGNORE = -100  # cross_entropy's ignore_index: no target


@dataclass(frozen=True)
class Rows:
    """Stored rows as model inputs, and the next-token targets."""

    input_ids: torch.Tensor  # [B, L] int64
    position_ids: torch.Tensor  # [B, L] int64, the model's positions as collected
    segment_ids: torch.Tensor  # [B, L] int32, 1, 2, ... per document piece, 0 = padding
    labels: torch.Tensor  # [B, L] int64, the next stored token of the same document, else IGNORE


def model_inputs(
    ids: torch.Tensor, positions: torch.Tensor, documents: torch.Tensor | None, continues: torch.Tensor
) -> Rows:
    """Rows as collection forwarded them, from stored ids, positions [B, L] and documents (None
    before format 4: positions alone cut the segments); `continues` [B] bool: the row's first
    piece continues the previous row's last document."""
    ids, pos = ids.long(), positions.long()
    real = pos >= 0
    new = torch.ones_like(real)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if documents is not None:
        new[:, 1:] |= documents[:, 1:] != documents[:, :-1]
    new &= real
    seg = torch.cumsum(new, 1) * real
    # A piece's first stored token: the model saw it at position 0 if the piece continues a
    # document from the previous row, else at its position in the document.
    first = _carry(pos, new)
    restart = (seg == 1) & continues[:, None]
    position_ids = torch.where(restart, pos - first, pos) * real
    labels = torch.full_like(ids, IGNORE)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & (pos[:, 1:] == pos[:, :-1] + 1)
    labels[:, :-1] = torch.where(same, ids[:, 1:], IGNORE)
    return Rows(ids * real, position_ids, seg.to(torch.int32), labels)


def _carry(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Each position's value at the latest start at or before it (0 before the first)."""
    index = torch.where(starts, torch.arange(values.shape[1]).expand_as(values), 0)
    return values.gather(1, torch.cummax(index, 1).values)


def stored_rows(store: Store, folder: str, max_tokens: int | None, split: Split | None = None) -> Iterator[Rows]:
    """A hook folder's files in storage order (machine, then file), as model inputs, one file at a
    time, until `max_tokens` stored tokens; with `split`, only that side's documents (the others
    become padding: documents are isolated, so this changes nothing for the ones kept)."""
    names = sorted(
        (parsed, e.key) for e in store.list(folder + "/") if (parsed := parse_file_name(e.key.rsplit("/", 1)[-1]))
    )
    left = max_tokens
    last: tuple[int, int, int] | None = None  # (machine, document, position) of the previous row's last token
    for (machine, _), key in names:
        mb = decode(store.get(key), store.url(key), verify_checksums=True)
        ids, pos, docs = mb.input_ids, mb.positions, mb.documents
        if pos is None:
            raise ConfigError(f"{store.url(key)} holds no positions (a legacy file): its rows cannot be run again")
        # Whether a row's first piece continues the previous row's last document, from the rows as stored.
        prev_pos = torch.cat([torch.tensor([-2 if last is None or last[0] != machine else last[2]]), pos[:-1, -1]])
        continues = pos[:, 0] == prev_pos.to(pos.dtype) + 1
        if docs is not None:
            prev_doc = torch.cat([torch.tensor([-1 if last is None or last[0] != machine else last[1]]), docs[:-1, -1]])
            continues &= docs[:, 0] == prev_doc
        last = (machine, -1 if docs is None else int(docs[-1, -1]), int(pos[-1, -1]))
        real = pos >= 0
        if split is not None:
            flat = None if docs is None else docs.numpy().reshape(-1)
            real &= torch.from_numpy(split.keep(key.rsplit("/", 1)[-1], flat, store.url(key))).reshape(real.shape)
            pos = torch.where(real, pos, -1)
            docs = None if docs is None else torch.where(real, docs, -1)
        continues &= real[:, 0]
        counts = real.sum(1)
        if left is not None:  # the rows holding the next `left` real tokens
            rows = int((counts.cumsum(0) < left).sum()) + 1
            ids, pos, continues, counts = ids[:rows], pos[:rows], continues[:rows], counts[:rows]
            docs = None if docs is None else docs[:rows]
            left -= int(counts.sum())
        some = counts > 0  # rows of the other side only: nothing to run
        if bool(some.any()):
            yield model_inputs(ids[some], pos[some], None if docs is None else docs[some], continues[some])
        if left is not None and left <= 0:
            return


def _replace_first_tensor(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
    """(args, kwargs) with the tensor a pre hook captures (collection/hooks.py's choice) replaced."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return (*args[:i], fn(a), *args[i + 1 :]), kwargs
    key = "hidden_states" if isinstance(kwargs.get("hidden_states"), torch.Tensor) else None
    key = key or next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    if key is None:
        raise RuntimeError("hooked module received no tensor input")
    return args, {**kwargs, key: fn(kwargs[key])}


def _replace_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    if isinstance(output, list):
        return [fn(output[0]), *output[1:]]
    raise RuntimeError(f"hooked module returned {type(output).__name__}: its output cannot be replaced")


class Splice:
    """While open, the hook's activation [B, L, d] is replaced by `fn` of it in every forward."""

    def __init__(self, model: nn.Module, spec: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]):
        module = model.get_submodule(spec.module)
        if spec.kind == "pre":
            self._handle = module.register_forward_pre_hook(
                lambda m, args, kwargs: _replace_first_tensor(args, kwargs, fn), with_kwargs=True
            )
        else:
            self._handle = module.register_forward_hook(lambda m, args, out: _replace_output(out, fn))

    def __enter__(self) -> Splice:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class LMLoss:
    """Mean next-token cross-entropy (nats) over the same predicted tokens, three ways."""

    tokens: int  # predicted tokens
    clean: float  # the model as it is
    sae: float  # the SAE's reconstruction at the hook
    zero: float  # zeros at the hook

    @property
    def recovered(self) -> float:
        """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as the model, 0 = as bad as zeros."""
        gap = self.zero - self.clean
        return (self.zero - self.sae) / gap if gap != 0 else float("nan")


def _loss_sum(model: nn.Module, rows: Rows, device: torch.device) -> float:
    ids, pos, seg, labels = (t.to(device) for t in (rows.input_ids, rows.position_ids, rows.segment_ids, rows.labels))
    mask = attention_inputs(model, seg)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    return float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum"))


def lm_loss(
    model: nn.Module,
    hook: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    rows: Iterator[Rows],
    rows_per_forward: int = 8,
) -> LMLoss:
    """CE clean, with `reconstruct` at `hook` (as collection resolves it) and with zeros there."""
    (spec,) = resolve_hooks(model, [hook])
    device = next(model.parameters()).device
    sums, tokens = [0.0, 0.0, 0.0], 0
    with torch.no_grad():
        for chunk in rows:
            for i in range(0, chunk.input_ids.shape[0], rows_per_forward):
                part = Rows(*(t[i : i + rows_per_forward] for t in vars(chunk).values()))
                tokens += int((part.labels != IGNORE).sum())
                sums[0] += _loss_sum(model, part, device)
                with Splice(model, spec, reconstruct):
                    sums[1] += _loss_sum(model, part, device)
                with Splice(model, spec, torch.zeros_like):
                    sums[2] += _loss_sum(model, part, device)
    if tokens == 0:
        raise ConfigError(f"no stored token has a next token of its document to predict in the rows read at {hook}")
    clean, sae, zero = (s / tokens for s in sums)
    return LMLoss(tokens, clean, sae, zero)
