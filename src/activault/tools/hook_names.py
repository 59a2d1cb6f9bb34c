"""`activault hooks MODEL`: every hook name a config may use on a model, with its width, bytes per
token and the module it attaches to, from the model's config alone (a skeleton on the meta device:
no weights are read, nothing is downloaded for a shipped config or a local folder)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from activault import dtypes
from activault.config import TransformerConfig
from activault.errors import ConfigError, shown


@dataclass(frozen=True)
class HookRow:
    """One hook a collection can store."""

    name: str  # as a config writes it in upload_config.hooks
    module: str  # the module path it attaches to
    kind: str  # "pre": the module's input, "post": its output
    block: int | None  # the block it lives in; None outside the blocks
    width: int  # last dimension of the stored states
    bytes_per_token: int  # width x the dtype's size, uncompressed


@dataclass(frozen=True)
class ModelHooks:
    """A model's storable hooks and the facts they depend on."""

    model: str
    architecture: str
    blocks: int
    dtype: str
    hooks: list[HookRow]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shipped_models() -> list[str]:
    """Hub ids of the model configs shipped with activault (usable offline)."""
    folder = resources.files("activault").joinpath("model_configs")
    return sorted(
        p.name.removesuffix(".json").replace("--", "/", 1) for p in folder.iterdir() if p.name.endswith(".json")
    )


def _is_folder(name: str) -> bool:
    try:
        return Path(name).is_dir()
    except (OSError, ValueError):  # a name no path can have (too long, a NUL)
        return False


def model_hooks(model: str, dtype: str = "bfloat16") -> ModelHooks:
    """Every storable hook of `model` (a shipped config's hub id, a local folder, a cached hub id)."""
    from activault.collection.hooks import find_blocks, hook_points, storable_widths
    from activault.collection.model import load_skeleton, shipped_config, stored_dtype

    if dtypes.canonical(dtype) is None:
        raise ConfigError(f"--dtype {shown(dtype)} is unknown: use float32, float16, bfloat16 or auto")
    # Eager attention: every architecture has it, and the kernel changes no hook's name or width.
    tcfg = TransformerConfig(model_name=model, dtype=dtype, device="cpu", attn_implementation="eager")
    try:
        skeleton = load_skeleton(tcfg)
    except ConfigError as e:
        if _is_folder(model) or shipped_config(model) is not None:
            raise
        raise ConfigError(
            f"model {shown(model)} is no local folder and none of the shipped configs "
            f"({', '.join(shipped_models())}), and its config could not be loaded "
            f"({str(e).split(' Fix: ')[0]}). Fix: give a folder holding the model's config.json (weights "
            "are not needed), a shipped config's id, or a hub id whose config.json is in the Hugging Face "
            "cache (`hf download ID config.json`)"
        ) from None
    points = hook_points(skeleton)
    widths = storable_widths(skeleton, points)
    itemsize = stored_dtype(tcfg, skeleton.config).itemsize
    _, blocks = find_blocks(skeleton)
    rows = [
        HookRow(p.name, p.module, p.kind, p.block, widths[p.name], widths[p.name] * itemsize)
        for p in points
        if p.name in widths
    ]
    arch = (getattr(skeleton.config, "architectures", None) or [type(skeleton).__name__])[0]
    return ModelHooks(model, arch, len(blocks), dtypes.name(stored_dtype(tcfg, skeleton.config)), rows)


def _pattern(text: str, block: int | None) -> str:
    """`text` with its block index written `{i}`: one line for the same hook of every block."""
    if block is None:
        return text
    return re.sub(rf"\.{block}(\.|$)", r".{i}\1", text, count=1)


def hook_lines(found: ModelHooks) -> list[str]:
    """The table `activault hooks` prints: one line per hook, the blocks' hooks once for every i."""
    groups: dict[tuple[str, str, str], list[HookRow]] = {}
    for r in found.hooks:
        groups.setdefault((_pattern(r.name, r.block), _pattern(r.module, r.block), r.kind), []).append(r)
    table = []
    for (name, module, kind), rows in groups.items():
        widths = sorted({r.width for r in rows})
        costs = sorted({r.bytes_per_token for r in rows})
        blocks = [r.block for r in rows if r.block is not None]
        where = f"{'input' if kind == 'pre' else 'output'} of {module}"
        if blocks and len(blocks) < found.blocks:
            where += f" (blocks {', '.join(map(str, blocks))} only)"
        width = f"{widths[0]:,}" if len(widths) == 1 else f"{widths[0]:,}-{widths[-1]:,}"
        cost = f"{costs[0]:,}" if len(costs) == 1 else f"{costs[0]:,}-{costs[-1]:,}"
        table.append((name, width, cost, where))
    size = max(len(r[0]) for r in table)
    last = found.blocks - 1
    head = [
        f"{found.model}: {found.architecture}, {found.blocks} blocks (i = 0..{last}, or -{found.blocks}..-1 "
        f"from the end), stored as {found.dtype}",
        f"{'hook (upload_config.hooks)':<{size}}  {'width':>7}  {'bytes/token':>11}  attaches to",
    ]
    body = [f"{n:<{size}}  {w:>7}  {c:>11}  {m}" for n, w, c, m in table]
    foot = [
        "",
        f"models.layers.{{i}}.pre|post are the residual stream; e.g. models.layers.{last}.post is the last "
        "block's output. Bytes per token are before compression; --json lists every hook of every block.",
    ]
    return head + body + foot


def run_hooks(model: str, dtype: str = "bfloat16", as_json: bool = False) -> int:
    found = model_hooks(model, dtype)
    print(json.dumps(found.to_dict(), indent=1) if as_json else "\n".join(hook_lines(found)))
    return 0
