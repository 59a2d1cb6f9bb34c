"""Loading the tokenizer and model (dtype, device map, memory caps), a weightless skeleton for
validation, and truncation after the last hooked block.

torch and the hook machinery are imported where they are used: `estimate` reads the shipped and
local model configs through this module and imports neither.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from activault import dtypes
from activault.collection.arch import is_causal_lm, n_layers, text_config
from activault.errors import ConfigError, shown

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from activault.collection.hooks import HookPoint
    from activault.config import TransformerConfig

log = logging.getLogger(__name__)
_UNSET = object()


def _is_folder(name: str) -> bool:
    """Whether `name` is an existing local folder; a name no path can have (a part over 255 bytes,
    a NUL) is none, rather than an OSError: it is then tried as a hub id, and refused as one."""
    try:
        return Path(name).is_dir()
    except (OSError, ValueError):
        return False


def _opts(tcfg: TransformerConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"cache_dir": tcfg.cache_dir, **tcfg.kwargs}
    if not _is_folder(tcfg.model_name) and hub_offline():
        opts["local_files_only"] = True  # the cache or nothing: no minute of retries
    return opts


def _hub_address() -> tuple[str, int]:
    """HF_ENDPOINT's host and port (a mirror may listen on any port; the Hub itself on 443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port
    except ValueError:  # a port that is not a number: the Hub client fails on it too
        port = None
    return url.hostname or "huggingface.co", port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_offline() -> bool:
    """Whether the Hugging Face Hub is off limits: HF_HUB_OFFLINE set, or no connection in 2 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        socket.create_connection(_hub_address(), timeout=2).close()
    except OSError:
        log.info("the Hugging Face Hub (%s:%d) is unreachable: using local files only", *_hub_address())
        return True
    return False


def local_config(model_name: str) -> dict[str, Any] | None:
    """The config.json of a local model folder, or None when `model_name` is no such folder."""
    path = Path(model_name) / "config.json"
    if not _is_folder(model_name) or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # damaged: transformers names the problem when it loads it
        return None
    return data if isinstance(data, dict) else None


def shipped_config(model_name: str) -> dict[str, Any] | None:
    """The config.json shipped with activault for a model of the shipped configs (numbers, no weights)."""
    if "/" not in model_name:
        return None
    entry = resources.files("activault").joinpath("model_configs", model_name.replace("/", "--") + ".json")
    try:
        if not entry.is_file():
            return None
    except (OSError, ValueError):  # a name no file can have (too long, a NUL): not a shipped one
        return None
    data: dict[str, Any] = json.loads(entry.read_text())
    return data


def _not_found(tcfg: TransformerConfig, what: str, err: Exception) -> ConfigError:
    name = shown(tcfg.model_name)
    if not _is_folder(tcfg.model_name) and hub_offline():
        return ConfigError(
            f"transformer_config.model_name={name}: the {what} is not in the local "
            "Hugging Face cache and the Hub is unreachable (or HF_HUB_OFFLINE is set). Fix: download it "
            "on a connected machine (`hf download <id>`) into the cache or a folder, and point "
            "model_name (or transformer_config.cache_dir) at it."
        )
    cause = (str(err).strip().splitlines() or [""])[0][:300]
    return ConfigError(
        f"transformer_config.model_name={name}: cannot load the {what} "
        f"({type(err).__name__}: {cause}). Fix: give an existing local folder holding config.json and "
        "weights, or a hub id that is already in transformer_config.cache_dir (or the Hugging Face "
        "cache), or download it first with `hf download <id>`; pass trust_remote_code via "
        "transformer_config.kwargs if the model needs it."
    )


def _dtype(tcfg: TransformerConfig) -> torch.dtype | str:
    # The config validated the name already; "auto" is passed through to transformers.
    return "auto" if tcfg.dtype == "auto" else dtypes.to_torch(tcfg.dtype)


def load_tokenizer(tcfg: TransformerConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer (from model_name)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tcfg.model_name, **_opts(tcfg))
    except Exception as err:  # noqa: BLE001 - a damaged folder raises many kinds (TypeError for a config.json list)
        raise _not_found(tcfg, "tokenizer", err) from err


def load_config(tcfg: TransformerConfig) -> Any:
    """The model's transformers config, with the requested attention implementation."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(tcfg.model_name, **_opts(tcfg))
    except Exception as err:  # noqa: BLE001 - a damaged folder raises many kinds (TypeError, hub validation)
        shipped = shipped_config(tcfg.model_name)
        if shipped is None or _is_folder(tcfg.model_name):
            raise _not_found(tcfg, "config", err) from err
        # Enough for hook names, widths and the estimate; the weights still need the Hub or a cache.
        fields = {k: v for k, v in shipped.items() if k != "model_type"}
        config = AutoConfig.for_model(shipped["model_type"], **fields)
        config._name_or_path = tcfg.model_name
    config._attn_implementation = tcfg.attn_implementation
    return config


def _auto_class(config: Any) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def stored_dtype(tcfg: TransformerConfig, config: Any) -> torch.dtype:
    """The dtype of weights and stored activations: the configured one, or the checkpoint's for auto."""
    import torch

    dtype = _dtype(tcfg)
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = dtypes.lookup(found)
    return found if isinstance(found, torch.dtype) else torch.float32


def load_skeleton(tcfg: TransformerConfig) -> nn.Module:
    """The model built from its config on the meta device (no weights): for hook names and dims."""
    import torch

    config = load_config(tcfg)
    cls = _auto_class(config)
    try:
        with torch.device("meta"):
            model = cls.from_config(config, dtype=stored_dtype(tcfg, config), **tcfg.kwargs)
    except ValueError as err:  # e.g. an attention implementation the architecture lacks
        raise _attention_error(tcfg, config, err) from None
    return model.eval()


def _attention_error(tcfg: TransformerConfig, config: Any, err: Exception) -> ConfigError:
    return ConfigError(
        f"model {tcfg.model_name!r} with attn_implementation={config._attn_implementation!r}: "
        f"{str(err).splitlines()[0]} Fix: choose another transformer_config.attn_implementation "
        "('eager' works for every model)."
    )


def runs_on_cpu(tcfg: TransformerConfig) -> bool:
    """Whether the forward pass runs on the CPU (device cpu, or auto without CUDA)."""
    import torch

    return tcfg.device == "cpu" or (tcfg.device == "auto" and not torch.cuda.is_available())


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets: blocks up to 32 MiB
# (the largest glibc allows) come from the heap, and up to 1 GiB of freed heap is kept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED, _HEAP_BLOCKS = 1 << 30, 32 << 20


def keep_freed_memory() -> bool:
    """Have the C library keep the memory this process frees for reuse; True if it was set.

    A forward pass on the CPU allocates and frees its activations every batch, and glibc hands
    much of it back to the kernel (heap trimmed, blocks unmapped), so the next batch faults those
    pages in again, a fault per page (docs/benchmarks.md has the counts). Process-wide and never
    undone (glibc has no way back to its adaptive defaults); a no-op off glibc (musl, macOS): False.
    """
    try:
        libc = ctypes.CDLL(None)
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = libc.mallopt
    except (AttributeError, OSError, ValueError):
        return False
    # Both at once: setting either turns glibc's adaptive thresholds off, and the trim threshold
    # alone left every block over 128 KiB unmapped on free (more faults than the defaults).
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED))


def _device_map(tcfg: TransformerConfig) -> dict[str, Any]:
    import torch

    device = tcfg.device  # validated by the config: auto, cpu, mps, cuda or cuda:N
    if runs_on_cpu(tcfg):
        return {}
    if device == "auto":
        out: dict[str, Any] = {"device_map": "auto"}
        if tcfg.max_per_device_memory:
            out["max_memory"] = {i: tcfg.max_per_device_memory for i in range(torch.cuda.device_count())}
        return out
    return {"device_map": {"": device}}


def keep_layers(specs: list[HookPoint], n: int) -> int:
    """Blocks needed by the hooks: all of them when a hook is outside the blocks (e.g. final norm)."""
    if not specs or any(s.block is None for s in specs):
        return n
    return max(s.block for s in specs if s.block is not None) + 1


def _truncate_config(config: Any, keep: int) -> None:
    text = text_config(config)
    text.num_hidden_layers = keep
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:keep])


def truncate(model: nn.Module, specs: list[HookPoint]) -> nn.Module:
    """Drop the blocks after the last hooked one and the LM head when no hook needs them."""
    from torch import nn

    from activault.collection.hooks import find_blocks

    blocks_path, blocks = find_blocks(model)
    n = len(blocks)
    keep = keep_layers(specs, n)
    if keep < n:
        parent_path, _, attr = blocks_path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, nn.ModuleList(list(blocks)[:keep]))
        _truncate_config(model.config, keep)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    hooked = [s.module for s in specs]
    if head is not None and not isinstance(head, nn.Identity):
        name = next(n for n, m in model.named_modules() if m is head)
        if not any(h == name or h.startswith(name + ".") or name.startswith(h + ".") for h in hooked):
            # With tied embeddings the weight stays alive through the input embedding: only the
            # head module goes, the shared Parameter is untouched.
            parent_path, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, nn.Identity())
    model.activault_layers = {"kept": min(keep, n), "of": n}  # type: ignore[assignment]
    return model


@contextmanager
def _ignoring_dropped_blocks(cls: Any, hooks: list[HookPoint], keep: int, n: int) -> Iterator[None]:
    """Weights of dropped blocks load silently instead of being reported as "UNEXPECTED".

    transformers reads the class attribute once per instance (in post_init), so it is set for
    this load only; a subclass would lose the class's checkpoint key conversions.
    """
    spec = next(h for h in hooks if h.block is not None)
    parts = spec.module.split(".")
    blocks_path = ".".join(parts[: parts.index(str(spec.block))])
    dropped = "|".join(str(i) for i in range(keep, n))
    pattern = rf"(^|\.){re.escape(blocks_path)}\.({dropped})\."
    before = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _UNSET)
    cls._keys_to_ignore_on_load_unexpected = [
        *(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []),
        pattern,
    ]
    try:
        yield
    finally:
        if before is _UNSET:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = before


def load_model(tcfg: TransformerConfig, hooks: list[HookPoint]) -> nn.Module:
    """The model, eval and without grads, truncated after the last hooked block.

    The config is truncated before loading, so weights of dropped blocks are never read or placed
    on a device (transformers logs them as unused keys).
    """
    config = load_config(tcfg)
    n = n_layers(config)
    keep = keep_layers(hooks, n) if n is not None else None
    if n is not None and keep is not None and keep < n:
        _truncate_config(config, keep)
    auto = _auto_class(config)
    quiet: Any = nullcontext()
    if n is not None and keep is not None and keep < n and type(config) in auto._model_mapping:
        quiet = _ignoring_dropped_blocks(auto._model_mapping[type(config)], hooks, keep, n)
    try:
        with quiet:
            model = auto.from_pretrained(
                tcfg.model_name,
                config=config,
                dtype=_dtype(tcfg),
                **_device_map(tcfg),
                **_opts(tcfg),
            )
    except OSError as err:
        raise _not_found(tcfg, "model", err) from err
    except ValueError as err:  # e.g. an attention implementation the architecture lacks
        raise _attention_error(tcfg, config, err) from None
    model.eval().requires_grad_(False)
    truncate(model, hooks)
    if n is not None:
        model.activault_layers = {"kept": keep, "of": n}  # type: ignore[assignment]
    return model


def model_info(model: nn.Module, hooks: list[HookPoint] | None = None) -> dict[str, Any]:
    """Facts about the model stored with the run: name, architecture, dims, dtype.

    `hooks`: those the run captures; a skeleton (not truncated) then records the blocks that
    `load_model` will load and run, not all of its own.
    """
    from activault.collection.hooks import find_blocks

    config: Any = model.config
    text = text_config(config)
    _, blocks = find_blocks(model)
    kept = keep_layers(hooks, len(blocks)) if hooks is not None else len(blocks)
    layers = getattr(model, "activault_layers", {"kept": kept, "of": len(blocks)})
    emb = model.get_input_embeddings()  # type: ignore[operator]
    return {
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", ""),
        "d_model": int(text.hidden_size),
        "n_layers": int(layers["of"]),
        "n_layers_kept": int(layers["kept"]),
        "vocab_size": int(getattr(text, "vocab_size", 0) or 0),
        "causal": is_causal_lm(config),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "dtype": dtypes.name(emb.weight.dtype),
    }
