"""The one dtype table: config names, torch dtypes and safetensors codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# What a user may write in a config -> the canonical name.
ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "torch.float32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "torch.float16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "auto": "auto",
}
# Canonical name -> safetensors code, for every dtype a megabatch may hold.
CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def canonical(name: str) -> str | None:
    """The canonical name of a config dtype ("bf16" -> "bfloat16"), or None if unknown."""
    return ALIASES.get(str(name).strip().lower())


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of a canonical name or safetensors code; KeyError if unknown."""
    import torch

    name = {v: k for k, v in CODES.items()}.get(name, name)
    if name not in CODES:
        raise KeyError(name)
    dt = getattr(torch, name)
    assert isinstance(dt, torch.dtype)
    return dt


def lookup(text: str) -> torch.dtype | None:
    """The torch dtype a file or record names ("bfloat16", "torch.bfloat16", "BF16"), or None if it is
    not one a megabatch may hold."""
    try:
        return to_torch(str(text).removeprefix("torch."))
    except KeyError:
        return None


def name(dtype: torch.dtype) -> str:
    """ "torch.bfloat16" -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype ("BF16")."""
    return CODES[name(dtype)]
