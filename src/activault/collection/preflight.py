"""The one preflight `estimate` and `collect` run before any weights load: data, hooks, sizes,
memory and free space, every problem reported at once; and the estimate built on it.

A model's shape comes from its config.json alone (shipped or a local folder) for the dense decoders
of `DENSE`, so `estimate` imports neither torch nor transformers' modeling code; any other model,
or a hook named by module path, is read from a weightless skeleton (as `collect` always does).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activault.collection.plan import (
    ITEMSIZE,
    Plan,
    available_memory,
    feasibility_problems,
    make_plan,
    pinned_limit,
    tokens_line,
)
from activault.config import Config, TransformerConfig, memory_bytes, resolve_storage
from activault.errors import ActivaultError, ConfigError, StorageError
from activault.storage import Store, open_store
from activault.units import duration, human_bytes, parse_bandwidth

if TYPE_CHECKING:
    from torch import nn

# Dense decoders whose blocks are (self_attn, gated mlp) as transformers builds them, planned from
# config.json alone: model_type -> (norms per block, q/k/v biases always, tie_word_embeddings default).
DENSE = {
    "llama": (2, False, False),
    "mistral": (2, False, False),
    "qwen2": (2, True, False),
    "gemma2": (4, False, True),
    "cohere2": (1, False, True),
}
# Attention kernels transformers builds each of them with (others are left to the skeleton, which
# refuses what the architecture lacks, and flash_attention_2 needs its package).
KERNELS = {kind: {"eager", "sdpa"} for kind in DENSE} | {"gemma2": {"eager"}}
_NEEDED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Hook names of the block forms (hooks.py's grammar); a module path needs the skeleton.
BLOCK_NAME = re.compile(r"^models\.layers\.(-?\d+)(?:\.(self_attn|attn|attention|mlp))?\.(pre|post)$")
# Room kept free beyond the plan: sizes with compression are assumed, records and temp files add.
SPACE_MARGIN, SPACE_SLACK = 1.1, 64 << 20


@dataclass
class Shape:
    """What the checks need of a model, from config.json alone or from a weightless skeleton."""

    model_type: str
    n_layers: int
    d_model: int
    max_positions: Any  # max_position_embeddings as the config says it (checked only if an int)
    dtype: str  # of weights and stored states
    dims: dict[str, int]  # hook -> width, for the hooks that resolved
    blocks: dict[str, int | None]  # hook -> its block (None: outside the blocks)
    params: int  # parameters kept on the device: the blocks up to the deepest hook
    problems: list[str] = field(default_factory=list)  # hooks that do not resolve

    @property
    def kept(self) -> int:
        """Blocks loaded: up to the deepest hook, all of them for a hook outside the blocks."""
        if not self.blocks or any(b is None for b in self.blocks.values()):
            return self.n_layers
        return max(b for b in self.blocks.values() if b is not None) + 1

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def weight_bytes(self) -> int:
        return self.params * self.itemsize


def _text(config: dict[str, Any]) -> dict[str, Any]:
    """The language part of a config.json (multimodal models nest it)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _dtype_name(tc: TransformerConfig, config: dict[str, Any]) -> str:
    """model.stored_dtype without torch: the configured dtype, or the checkpoint's for auto."""
    if tc.dtype != "auto":
        return tc.dtype
    found = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    return found if found in ITEMSIZE else "float32"


def config_shape(tc: TransformerConfig, hooks: list[str]) -> Shape | None:
    """The shape from config.json alone, or None when it needs the skeleton (see DENSE)."""
    from activault.collection.model import local_config, shipped_config

    raw = local_config(tc.model_name) or shipped_config(tc.model_name)
    if raw is None:
        return None
    c = _text(raw)
    kind = c.get("model_type", "")
    if kind not in DENSE or not all(isinstance(c.get(k), int) for k in _NEEDED) or tc.kwargs:
        return None
    if tc.attn_implementation not in KERNELS[kind]:
        return None
    if kind in ("gemma2", "cohere2") and not c.get("head_dim"):  # their classes' defaults differ from h / heads
        return None
    if not all(BLOCK_NAME.match(h) for h in hooks):
        return None
    n, h = c["num_hidden_layers"], c["hidden_size"]
    dims: dict[str, int] = {}
    blocks: dict[str, int | None] = {}
    problems = []
    for name in hooks:
        i = int(BLOCK_NAME.match(name).group(1))  # type: ignore[union-attr]
        if not -n <= i < n:  # hooks._block_index's message
            problems.append(
                f"hook {name!r}: layer {i} out of range, the model has {n} layers (0..{n - 1}, or -1 for the last)"
            )
            continue
        dims[name], blocks[name] = h, i % n
    shape = Shape(kind, n, h, c.get("max_position_embeddings"), _dtype_name(tc, c), dims, blocks, 0, problems)
    embed, block, norm = _dense_params(c, kind)
    shape.params = embed + shape.kept * block + norm
    return shape


def _dense_params(c: dict[str, Any], kind: str) -> tuple[int, int, int]:
    """Parameters of a DENSE decoder: (embeddings, one block, final norm), as transformers builds it."""
    h, heads, inter = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    norms, qkv_bias, _ = DENSE[kind]
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    if c.get("attention_bias"):
        attn += heads * hd + 2 * kv * hd + h
    elif qkv_bias:
        attn += heads * hd + 2 * kv * hd
    mlp = 3 * h * inter + (2 * inter + h if c.get("mlp_bias") else 0)
    return c["vocab_size"] * h, attn + mlp + norms * h, h


def skeleton_shape(skeleton: nn.Module, tc: TransformerConfig, hooks: list[str]) -> Shape:
    """The shape of a weightless skeleton (`model.load_skeleton`): every hook tried, each failure kept."""
    from activault import dtypes
    from activault.collection.arch import text_config
    from activault.collection.hooks import find_blocks, hook_dims, resolve_hooks
    from activault.collection.model import stored_dtype

    specs, problems = [], []
    for name in hooks:
        try:
            specs += resolve_hooks(skeleton, [name])
        except ConfigError as e:
            problems.append(str(e))
    text = text_config(skeleton.config)
    blocks_path, layers = find_blocks(skeleton)
    shape = Shape(
        str(getattr(skeleton.config, "model_type", "")),
        len(layers),
        int(text.hidden_size),
        getattr(text, "max_position_embeddings", None),
        dtypes.name(stored_dtype(tc, skeleton.config)),
        hook_dims(skeleton, specs) if specs else {},
        {s.name: s.block for s in specs},
        0,
        problems,
    )
    dropped = tuple(f"{blocks_path}.{i}." for i in range(shape.kept, len(layers)))
    get_head = getattr(skeleton, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_name = next((n for n, m in skeleton.named_modules() if m is head), None) if head is not None else None
    if head_name is not None and any(s.module.startswith(head_name) or head_name.startswith(s.module) for s in specs):
        head_name = None  # a hook needs the head: model.truncate keeps it
    if head_name is not None:
        dropped += (head_name + ".",)
    # named_parameters lists a tied weight once, under the embedding (first in module order).
    shape.params = sum(p.numel() for n, p in skeleton.named_parameters() if not n.startswith(dropped))
    return shape


def model_shape(tc: TransformerConfig, hooks: list[str]) -> Shape:
    """From config.json where that is enough (no torch), else from the skeleton."""
    shape = config_shape(tc, hooks)
    if shape is not None:
        return shape
    from activault.collection.model import load_skeleton

    return skeleton_shape(load_skeleton(tc), tc, hooks)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on the filesystem of `path` (or its nearest
    existing parent: the store's folder is made only when collect starts)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def machine_prefix(machine: int) -> str:
    """How records.file_name begins for a machine (vault/records.py imports torch: not imported here)."""
    return f"m{machine:05d}-"


def space_check(cfg: Config, plan: Plan, store: Store, machine: int) -> tuple[str | None, str | None]:
    """(problem, note): a machine's planned bytes still to write against the local store's free space
    (its files already written, on resume, are not needed again)."""
    if cfg.data_config.skip_cache:
        return None, None
    if plan.size == "unknown":
        return None, (
            f"free space at {store.uri} is not checked: n_batches: all stores an unknown amount "
            f"({plan.basis}); make sure the data's activations fit there"
        )
    root = getattr(store, "root", None)
    if not isinstance(root, Path):
        return None, (
            f"free space at {store.uri} cannot be known before writing (object stores have quotas, not a "
            f"free-space figure): make sure ~{human_bytes(plan.total_bytes)} fits there"
        )
    written = sum(
        e.size
        for e in store.list(cfg.run_name)
        if e.kind == "file" and e.key.rpartition("/")[2].startswith(machine_prefix(machine))
    )
    need = round(max(plan.total_bytes - written, 0) * SPACE_MARGIN) + SPACE_SLACK
    free = free_bytes(root)
    if need <= free:
        return None, None
    whose = f"machine {machine}" + (f" of {cfg.num_runs}" if cfg.num_runs > 1 else "")
    done = f", {human_bytes(written)} of it already written" if written else ""
    if plan.size == "at most":  # a bound, not a need: the run may well fit
        return None, (
            f"the local store {root} has {human_bytes(free)} free, and {whose} may need up to "
            f"~{human_bytes(need)} more (n_batches: all, bounded by the data's size{done}); watch its free "
            "space, or set upload_config.compression: zstd"
        )
    return (
        f"the local store {root} has {human_bytes(free)} free, but {whose} needs ~{human_bytes(need)} more "
        f"(plan {human_bytes(plan.total_bytes)}{done}, +10% margin): free space on that disk, choose "
        "another --storage, lower data_config.n_batches, or set upload_config.compression: zstd"
    ), None


@dataclass
class Preflight:
    """What the checks found: the plan, notes for the summary and every problem."""

    shape: Shape
    plan: Plan
    notes: list[str]
    problems: list[ActivaultError]

    def check(self) -> None:
        """Raise the problem found, or one error listing all of them."""
        if len(self.problems) == 1:
            raise self.problems[0]
        if self.problems:
            listed = "\n".join(f"  {i}. {e}" for i, e in enumerate(self.problems, 1))
            raise ConfigError(f"{len(self.problems)} problems, found before any weights load:\n{listed}")


def preflight(
    cfg: Config, shape: Shape, store: Store, machine: int | None, pinned: int | None, memory: int | None
) -> Preflight:
    """Every check before weights load, every problem kept (`Preflight.check` raises them).

    Args:
        machine: this machine's share; None (`estimate`): the whole run planned, machine 0's share
            (the largest) checked against the store's free space, as `collect` on it would.
        pinned: bytes of pinned host memory allowed (None: not on CUDA).
    """
    from activault.collection.sources import probe_local, source_for

    problems: list[ActivaultError] = [ConfigError(p) for p in shape.problems]
    notes = []
    try:
        source = source_for(cfg.data_config)
        if not probe_local(source, f"data_key {cfg.data_config.data_key!r}"):
            notes.append(
                f"data_key {cfg.data_config.data_key!r} is not local JSON: its fields are checked when collect "
                "starts (before weights load)"
            )
    except ActivaultError as e:
        problems.append(e)
    plan = make_plan(cfg, shape.dims, shape.itemsize, machine, shape.dtype)
    sizes = feasibility_problems(cfg, shape.dims, shape.itemsize, shape.max_positions, memory, pinned)
    problems += [ConfigError(p) for p in sizes]
    share = plan if machine is not None else make_plan(cfg, shape.dims, shape.itemsize, 0, shape.dtype)
    space, note = space_check(cfg, share, store, machine or 0)
    problems += [StorageError(space)] if space else []
    notes += [note] if note else []
    return Preflight(shape, plan, notes, problems)


def device_lines(tc: TransformerConfig, shape: Shape) -> list[str]:
    """The device, dtype, the weight memory it needs and the blocks loaded."""
    weights = human_bytes(shape.weight_bytes)
    if tc.device == "cpu":
        where = f"{weights} in host memory"
    elif tc.device != "auto":
        where = f"{weights} on {tc.device} (one device holds them all)"
    elif tc.max_per_device_memory:
        cap = memory_bytes(tc.max_per_device_memory)
        gpus = max(1, math.ceil(shape.weight_bytes / cap))
        where = (
            f"{weights} spread over the visible GPUs (device_map auto), at most {tc.max_per_device_memory} "
            f"each: {gpus} GPU(s) or more"
        )
    else:
        where = (
            f"{weights} spread over the visible GPUs (device_map auto; {weights} / GPUs each, plus "
            "activations), or host memory without one"
        )
    kept, n = shape.kept, shape.n_layers
    why = "only the blocks up to the deepest hook" if kept < n else "a hook needs the last block or one outside them"
    return [
        f"device       {tc.device}, {shape.dtype}",
        f"weights      {where}",
        f"blocks       {kept} of {n} loaded ({why})",
    ]


def _cuda_likely(tc: TransformerConfig) -> bool:
    """Whether the model would run on CUDA, without importing torch: a CUDA device, or auto with
    an NVIDIA driver loaded."""
    return tc.device.startswith("cuda") or (tc.device == "auto" and os.path.exists("/proc/driver/nvidia/version"))


def estimate(
    cfg: Config, price: float | None = None, bandwidth: str = "1Gbps", storage: str | None = None
) -> tuple[list[str], Preflight]:
    """What a config would store and cost, and the preflight `collect` runs (no weights load)."""
    rate = parse_bandwidth(bandwidth)
    if cfg.data_config.align_to is not None:  # the reference's data config, as collect uses it
        from activault.collection.align import aligned_config, reference

        ref = reference(cfg)
        cfg = cfg if ref is None else aligned_config(cfg, ref)
    shape = model_shape(cfg.transformer_config, cfg.upload_config.hooks)
    store = open_store(resolve_storage(cfg, storage))
    pinned = pinned_limit(_cuda_likely(cfg.transformer_config))
    found = preflight(cfg, shape, store, None, pinned, available_memory())
    plan = found.plan if price is None else replace(found.plan, price_per_gb_month=price)
    d = cfg.data_config
    amount = plan.amount
    lines = [
        f"model        {cfg.transformer_config.model_name}  ({shape.dtype})",
        *device_lines(cfg.transformer_config, shape),
        tokens_line(plan, f"{plan.rows_per_file} rows x {d.seq_length}"),
        f"files        {amount(str(plan.files))} per hook, {amount(str(plan.files * len(shape.dims)))} in total "
        f"({plan.rows_per_file} rows each, {cfg.num_runs} machine(s))",
    ]
    lines += [f"hook         {h}  d={shape.dims[h]}  {amount(human_bytes(b))}" for h, b in plan.bytes_per_hook.items()]
    lines += [note] if (note := plan.compression_line()) else []
    lines += [
        f"total        {amount(human_bytes(plan.total_bytes))}",
        f"cost         {amount(f'${plan.monthly_cost:,.2f}')}/month at ${plan.price_per_gb_month}/GB-month",
        f"buffers      {human_bytes(plan.buffer_bytes)} of host memory per machine for megabatches in flight",
        f"upload time  {amount(duration(plan.total_bytes / rate))} at {bandwidth.strip()}"
        + (
            f" ({amount(duration(plan.total_bytes / rate / cfg.num_runs))} per machine in parallel)"
            if cfg.num_runs > 1 and plan.size == "planned"
            else ""
        ),
        f"destination  {store.uri}/{cfg.run_name}",
    ]
    return lines + [f"note: {n}" for n in found.notes], found


def estimate_lines(
    cfg: Config, price: float | None = None, bandwidth: str = "1Gbps", storage: str | None = None
) -> list[str]:
    """The estimate's lines; what collect would refuse is raised instead."""
    lines, found = estimate(cfg, price, bandwidth, storage)
    found.check()
    return lines


def run_estimate(config: str, price: float | None = None, bandwidth: str = "1Gbps", storage: str | None = None) -> int:
    """Print the estimate, then raise what collect would refuse (the numbers help fix it)."""
    from activault.config import load_config

    lines, found = estimate(load_config(config), price, bandwidth, storage)
    print("\n".join(lines), flush=True)
    found.check()
    return 0
