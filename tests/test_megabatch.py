"""Megabatch format: round trip, safetensors compatibility, zero copy, damage named."""


from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from activault.errors import FormatError
from activault.vault.megabatch import decode, encode, file_name, parse_file_name


def megabatch(dtype=torch.bfloat16, rows=3, seq=5, d=4):
    g = torch.Generator().manual_seed(0)
    return {
        "states": torch.randn(rows, seq, d, generator=g).to(dtype),
        "input_ids": torch.randint(0, 1000, (rows, seq), generator=g, dtype=torch.int32),
        "positions": torch.arange(seq, dtype=torch.int32).repeat(rows, 1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_format_round_trip_and_safetensors_compatibility(tmp_path, dtype):
    tensors = megabatch(dtype)
    parts = encode(tensors, {"hook": "h", "file_index": "7"})
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"".join(parts))
    got, meta = decode(path.read_bytes(), "f.safetensors")
    assert meta == {"hook": "h", "file_index": "7"}
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    with safe_open(str(path), "pt") as f:  # the reference implementation reads our files
        assert f.metadata() == meta
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)


def test_encode_does_not_copy_the_states():
    tensors = megabatch(torch.float32)
    parts = encode(tensors, {})
    states_part = next(p for p in parts if p.nbytes == tensors["states"].numel() * 4)
    tensors["states"][0, 0, 0] = 42.0  # the buffer handed to the writer is the tensor's own memory
    assert np.frombuffer(states_part, dtype=np.float32)[0] == 42.0


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[:5], "truncated file"),
        (lambda b: b[:-7], "truncated file"),
        (lambda b: b + b"extra", "unexpected bytes"),
        (lambda b: b[:8] + b"{not json" + b[17:], "corrupted header"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "corrupted or truncated header"),
    ],
)
def test_damaged_files_raise_naming_the_file(damage, message):
    blob = b"".join(encode(megabatch(), {}))
    with pytest.raises(FormatError, match=f"m00001-000002.safetensors: .*{message}"):
        decode(damage(blob), "m00001-000002.safetensors")


def test_file_names_sort_by_machine_then_index_and_parse_back():
    names = [file_name(m, k) for m in (0, 1, 12) for k in (0, 1, 100)]
    assert names == sorted(names)
    assert [parse_file_name(n) for n in names] == [(m, k) for m in (0, 1, 12) for k in (0, 1, 100)]
    assert parse_file_name("statistics.json") is None and parse_file_name("abc--1.pt") is None


