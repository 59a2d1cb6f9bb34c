"""dtypes.py: the one dtype table (config names, torch dtypes, safetensors codes), checked against torch
and the safetensors library themselves."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from activault import dtypes


def safetensors_code(dtype: torch.dtype) -> str:
    """The dtype code the safetensors library itself writes for a tensor of `dtype`."""
    data = save({"t": torch.zeros(2, dtype=dtype)})
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["t"]["dtype"]


@pytest.mark.parametrize("name", sorted(dtypes.CODES))
def test_every_stored_dtype_round_trips_through_names_codes_and_torch(name):
    dt = getattr(torch, name)  # torch's own attribute: an independent source of the dtype
    assert dtypes.code(dt) == dtypes.CODES[name] == safetensors_code(dt)
    assert dtypes.name(dt) == name
    for spelling in (name, f"torch.{name}", dtypes.CODES[name], str(dt)):
        assert dtypes.lookup(spelling) is dt, spelling
    assert dtypes.to_torch(name) is dt and dtypes.to_torch(dtypes.CODES[name]) is dt


def test_codes_are_one_to_one():
    assert len(set(dtypes.CODES.values())) == len(dtypes.CODES)


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        (" torch.bfloat16 ", "bfloat16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("Float16", "float16"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("torch.float32", "float32"),
        ("auto", "auto"),
        ("AUTO", "auto"),
    ],
)
def test_config_aliases_name_one_canonical_dtype(alias, canonical):
    assert dtypes.canonical(alias) == canonical


def test_every_alias_is_a_float_torch_knows_or_auto():
    for alias, canonical in dtypes.ALIASES.items():
        assert dtypes.canonical(alias) == canonical
        if canonical != "auto":
            assert dtypes.to_torch(canonical).is_floating_point, alias
            assert dtypes.canonical(canonical) == canonical, "canonical names are aliases of themselves"


@pytest.mark.parametrize(
    "garbage",
    ["float8", "int8", "F32", "", "   ", "bf 16", "bfloat16\x00", "x" * 5000, None, 5, 1.5, b"bf16", ["bf16"]],
)
def test_config_names_that_are_no_float_dtype_are_unknown(garbage):
    assert dtypes.canonical(garbage) is None


@pytest.mark.parametrize(
    "garbage",
    ["float8", "bf16", "F8", "torch.", "torch.torch.float32", "", "F32\x00", "x" * 5000, "complex64", None, 5],
)
def test_lookup_of_what_no_megabatch_holds_is_none(garbage):
    assert dtypes.lookup(garbage) is None


@pytest.mark.parametrize("garbage", ["bf16", "F8", "complex64", "", "auto"])
def test_to_torch_of_an_unknown_name_is_a_key_error(garbage):
    with pytest.raises(KeyError):
        dtypes.to_torch(garbage)


def test_code_of_a_dtype_no_megabatch_holds_is_a_key_error():
    with pytest.raises(KeyError):
        dtypes.code(torch.complex64)
