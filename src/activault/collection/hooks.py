"""Hook names resolved against the model's own modules, capture of module inputs/outputs, and
attention inputs that isolate the documents packed into one row."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from activault.collection.arch import attention_windows, is_causal_lm, n_layers
from activault.errors import ConfigError

# Per-block aliases: (module receiving the input, module producing the output), relative to the block.
# BERT's feed-forward is split: `intermediate` (dense + act) then `output.dense` (before dropout,
# residual and LayerNorm), so its MLP is "input of intermediate" -> "output of output.dense".
_ALIASES: dict[str, list[tuple[str, str]]] = {
    "attn": [
        ("self_attn", "self_attn"),
        ("attn", "attn"),
        ("attention", "attention"),
        ("self_attention", "self_attention"),
    ],
    "mlp": [
        ("mlp", "mlp"),
        ("feed_forward", "feed_forward"),
        ("ffn", "ffn"),
        ("intermediate", "output.dense"),
    ],
}
_ALIAS_WORDS = {"self_attn": "attn", "attn": "attn", "attention": "attn", "mlp": "mlp"}
_BLOCK_NAME = re.compile(r"^models\.layers\.(-?\d+)(?:\.(self_attn|attn|attention|mlp))?\.(pre|post)$")


@dataclass(frozen=True)
class HookPoint:
    """One hook: where it attaches and what it records."""

    name: str  # as the user wrote it; also the storage folder name
    module: str  # resolved module path in model.named_modules()
    kind: Literal["pre", "post"]  # module input or output
    block: int | None  # index of the block it lives in (for truncation); None outside the blocks


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder/encoder blocks: its length is the config's layer count.

    Among candidates of that length, the one with the most parameters wins (a list of per-layer
    norms has the same length); without a layer count, the longest ModuleList.
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    n = n_layers(getattr(model, "config", None)) if hasattr(model, "config") else None
    matching = [(name, m) for name, m in lists if len(m) == n] or lists
    if not matching:
        raise ConfigError(f"{type(model).__name__} has no ModuleList of blocks to hook")
    return max(matching, key=lambda nm: (len(nm[1]), sum(p.numel() for p in nm[1].parameters())))


def _block_index(i: int, n: int, name: str) -> int:
    if not -n <= i < n:
        raise ConfigError(
            f"hook {name!r}: layer {i} out of range, the model has {n} layers (0..{n - 1}, or -1 for the last)"
        )
    return i % n


def _alias(block: nn.Module, word: str, kind: str) -> str | None:
    """Path (relative to the block) of the module an alias names, or None."""
    modules = dict(block.named_modules())
    for pre, post in _ALIASES[_ALIAS_WORDS[word]]:
        if pre in modules and post in modules:
            return pre if kind == "pre" else post
    return None


def _normalize_path(path: str, blocks_path: str, n: int, name: str) -> tuple[str, int | None]:
    """Rewrite a negative block index in a module path; return it with its block index."""
    prefix = blocks_path + "."
    if not path.startswith(prefix):
        return path, None
    head, _, rest = path[len(prefix) :].partition(".")
    if not re.fullmatch(r"-?\d+", head):
        return path, None
    i = _block_index(int(head), n, name)
    return prefix + str(i) + ("." + rest if rest else ""), i


def example_names(model: nn.Module) -> list[str]:
    """A few valid hook names for this model, for error messages and help."""
    blocks_path, blocks = find_blocks(model)
    last = len(blocks) - 1
    out = [f"models.layers.{last}.post", "models.layers.0.pre"]
    for word in ("self_attn", "mlp"):
        if _alias(blocks[0], word, "post") is not None:
            out += [f"models.layers.{last}.{word}.pre", f"models.layers.{last}.{word}.post"]
    children = [c for c, _ in blocks[0].named_modules() if c][:4]
    out += [f"{blocks_path}.{last}.{c}.post" for c in children]
    return out


def closest_names(model: nn.Module, name: str, n: int = 3) -> list[str]:
    """The valid hook names nearest to a mistyped one (our block names and every module path)."""
    blocks_path, blocks = find_blocks(model)
    words = [w for w in ("self_attn", "mlp") if _alias(blocks[0], w, "post") is not None]
    ours = [
        f"models.layers.{i}.{w}{k}"
        for i in range(len(blocks))
        for w in ["", *(x + "." for x in words)]
        for k in ("pre", "post")
    ]
    paths = [f"{m}.{k}" for m, _ in model.named_modules() if m for k in ("pre", "post")]
    return difflib.get_close_matches(name, ours + paths, n=n, cutoff=0.6)


def _unknown(model: nn.Module, name: str, why: str) -> ConfigError:
    blocks_path, _ = find_blocks(model)
    examples = ", ".join(example_names(model))
    near = closest_names(model, name)
    hint = f"Did you mean {' or '.join(repr(c) for c in near)}? " if near else ""
    return ConfigError(
        f"unknown hook {name!r}: {why}. {hint}Valid forms: 'models.layers.{{i}}.pre|post' (block input/output, "
        f"the residual stream), 'models.layers.{{i}}.self_attn|mlp.pre|post' (attention / MLP input/output), "
        f"or any module path of the model + '.pre|.post' (blocks are under {blocks_path!r}; list them with "
        f"`model.named_modules()`); i may be negative. Examples for this model: {examples}"
    )


def resolve_hooks(model: nn.Module, names: list[str]) -> list[HookPoint]:
    """Resolve user hook names to module paths of `model` (a skeleton is enough)."""
    blocks_path, blocks = find_blocks(model)
    n = len(blocks)
    modules = dict(model.named_modules())
    specs: list[HookPoint] = []
    for name in names:
        kind: Literal["pre", "post"]
        m = _BLOCK_NAME.match(name)
        if m:
            i = _block_index(int(m.group(1)), n, name)
            kind = "pre" if m.group(3) == "pre" else "post"
            path = f"{blocks_path}.{i}"
            if m.group(2):
                rel = _alias(blocks[i], m.group(2), kind)
                if rel is None:
                    raise _unknown(model, name, f"block {path} has no {m.group(2)} module")
                path += "." + rel
            specs.append(HookPoint(name, path, kind, i))
            continue
        path, dot, suffix = name.rpartition(".")
        if not dot or suffix not in ("pre", "post"):
            raise _unknown(model, name, "a hook name ends in '.pre' (module input) or '.post' (module output)")
        kind = "pre" if suffix == "pre" else "post"
        path, block = _normalize_path(path, blocks_path, n, name)
        if path not in modules:
            raise _unknown(model, name, f"the model has no module {path!r}")
        specs.append(HookPoint(name, path, kind, block))
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError(f"hook names must be unique, got {names}")
    return specs


def _input_weight(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix: its device receives the inputs, its dtype is the model's."""
    return cast(Any, model).get_input_embeddings().weight


class _StopForward(Exception):
    """Raised by the last needed hook: the rest of the forward (final norm, LM head) is skipped."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError("hooked module received no tensor input")


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise RuntimeError(f"hooked module returned {type(output).__name__}, not a tensor")


def packed_attention_mask(
    segment_ids: torch.Tensor, causal: bool, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """Additive mask [B, 1, L, L] (0 = attend, dtype min = blocked) isolating packed documents.

    A token attends to tokens of its own segment (causally for decoders, within `window` tokens
    when sliding). Padding (segment 0) attends only to itself, so no query row is fully masked
    and SDPA/softmax never produce NaN. Eager attention adds it to the scores; SDPA takes it as
    a float `attn_mask`; transformers passes a 4D mask through unchanged.
    """
    L = segment_ids.shape[-1]
    seg = segment_ids.long()
    q = torch.arange(L, device=seg.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)  # [B, Lq, Lk]
    if causal:
        allowed &= q[:, None] >= q[None, :]
    if window is not None:
        allowed &= (q[:, None] - q[None, :]).abs() < window
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    # torch.full, not torch.tensor: a Python scalar copied to the GPU would wait for queued work.
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, blocked)[:, None]


def attention_inputs(model: nn.Module, segment_ids: torch.Tensor) -> Any:
    """The `attention_mask` argument that isolates packed documents for this model.

    eager / sdpa: a 4D additive mask (a dict per layer type for models that mix full and sliding
    layers, e.g. Gemma2 and Qwen2, whose forward accepts such a mapping). flash_attention_2 and
    other kernels: None; transformers then detects the packing from the position_ids restarts
    and runs varlen attention per document (not testable on CPU).
    """
    config = model.config
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return None
    dtype = _input_weight(model).dtype
    causal = is_causal_lm(config)
    masks = {t: packed_attention_mask(segment_ids, causal, dtype, w) for t, w in attention_windows(config).items()}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _forward(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> None:
    """One forward of a packed batch, for its hooks; a hook may end it early (_StopForward)."""
    with torch.inference_mode():
        mask = attention_inputs(model, segment_ids)
        try:
            model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass


class Capture:
    """Records the hooked modules' inputs/outputs during one forward; stops after the last one."""

    def __init__(self, model: nn.Module, specs: list[HookPoint]):
        self.model = model
        self.specs = list(specs)
        self._out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
        for spec in self.specs:
            module = modules[spec.module]
            if spec.kind == "pre":
                h = module.register_forward_pre_hook(self._pre(spec.name), with_kwargs=True)
            else:
                h = module.register_forward_hook(self._post(spec.name))
            self._handles.append(h)

    def _store(self, name: str, t: torch.Tensor) -> None:
        # Detached, not cloned: the models we run never modify a block's input or output in place
        # (tests compare against cloned copies for every supported architecture), and the forward
        # stops right after the last hook anyway.
        if name not in self._out:
            self._out[name] = t.detach()
        if len(self._out) == len(self.specs):
            raise _StopForward

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._store(name, _first_tensor(args, kwargs))

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store(name, _output_tensor(output))

        return hook

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Activations [B, L, d] per hook name for a packed batch (segment 0 = padding)."""
        device = _input_weight(self.model).device
        # Pinned batches (see Batch.pin) copy without stalling the host behind the GPU.
        input_ids, position_ids, segment_ids = (
            t.to(device, non_blocking=t.is_pinned()) for t in (input_ids, position_ids, segment_ids)
        )
        self._out = {}
        _forward(self.model, input_ids, position_ids, segment_ids)
        out, self._out = self._out, {}
        missing = [s.name for s in self.specs if s.name not in out]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire during the forward pass")
        return {s.name: out[s.name] for s in self.specs}

    def close(self) -> None:
        """Remove the torch hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hook_dims(skeleton: nn.Module, specs: list[HookPoint], seq_len: int = 4) -> dict[str, int]:
    """Last dimension of each hook's activation, from a forward on the meta device."""
    device = _input_weight(skeleton).device
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    pos = torch.arange(seq_len, device=device)[None]
    seg = torch.ones(1, seq_len, dtype=torch.int32, device=device)
    with Capture(skeleton, specs) as cap:
        out = cap(ids, pos, seg)
    return {name: int(t.shape[-1]) for name, t in out.items()}


def hook_points(model: nn.Module) -> list[HookPoint]:
    """Every hook name a config may try on `model`: our block names, then each module path.

    Not all of them fire or give one vector per token (a ModuleList is never called, rotary
    embeddings give one per position): `storable_widths` tells which do.
    """
    blocks_path, blocks = find_blocks(model)
    kinds: tuple[Literal["pre", "post"], ...] = ("pre", "post")
    out = []
    for i, block in enumerate(blocks):
        for kind in kinds:
            out.append(HookPoint(f"models.layers.{i}.{kind}", f"{blocks_path}.{i}", kind, i))
        for word in ("self_attn", "mlp"):
            for kind in kinds:
                if (rel := _alias(block, word, kind)) is not None:
                    out.append(HookPoint(f"models.layers.{i}.{word}.{kind}", f"{blocks_path}.{i}.{rel}", kind, i))
    for path in dict(model.named_modules()):
        if path:
            index = _normalize_path(path, blocks_path, len(blocks), path)[1]
            out += [HookPoint(f"{path}.{kind}", path, kind, index) for kind in kinds]
    return out


def storable_widths(skeleton: nn.Module, specs: list[HookPoint]) -> dict[str, int]:
    """Width of each hook a collection can store: it fires in a forward and sees [rows, seq, d].

    One forward on the skeleton (meta device: no weights, no memory) with every hook attached;
    a hook that never fires, or sees no tensor or another shape, is left out.
    """
    rows, seq = 2, 3  # distinct, and unlike any head count: [rows, seq, d] is recognised
    seen: dict[tuple[str, str], torch.Tensor | None] = {}
    modules = dict(skeleton.named_modules())
    handles = []

    def keep(key: tuple[str, str], get: Callable[[], torch.Tensor]) -> None:
        if key not in seen:  # the first call, as Capture keeps it
            try:
                seen[key] = get()
            except RuntimeError:
                seen[key] = None

    for path, kind in dict.fromkeys((s.module, s.kind) for s in specs):
        key = (path, kind)
        if kind == "pre":
            handles.append(
                modules[path].register_forward_pre_hook(
                    lambda m, a, kw, key=key: keep(key, lambda: _first_tensor(a, kw)), with_kwargs=True
                )
            )
        else:
            handles.append(
                modules[path].register_forward_hook(lambda m, a, o, key=key: keep(key, lambda: _output_tensor(o)))
            )
    device = _input_weight(skeleton).device
    try:
        _forward(
            skeleton,
            torch.zeros(rows, seq, dtype=torch.long, device=device),
            torch.arange(seq, device=device).expand(rows, seq),
            torch.ones(rows, seq, dtype=torch.int32, device=device),
        )
    finally:
        for h in handles:
            h.remove()
    out = {}
    for s in specs:
        t = seen.get((s.module, s.kind))
        if t is not None and t.ndim == 3 and tuple(t.shape[:2]) == (rows, seq):
            out[s.name] = int(t.shape[-1])
    return out
