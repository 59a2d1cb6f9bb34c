"""Small megabatch files for the format's tests (tests/vault): encoded, edited, re-headed."""

from __future__ import annotations

import json
import struct

import torch

from activault.vault import codec as codecs
from activault.vault.megabatch import (
    FORMAT_VERSION,
    PROVENANCE_SINCE,
    encode,
)

NAME = "m00001-000002.safetensors"


def megabatch(dtype=torch.bfloat16, rows=3, seq=5, d=4):
    g = torch.Generator().manual_seed(0)
    return {
        "states": torch.randn(rows, seq, d, generator=g).to(dtype),
        "input_ids": torch.randint(0, 1000, (rows, seq), generator=g, dtype=torch.int32),
        "positions": torch.arange(seq, dtype=torch.int32).repeat(rows, 1),
    }


def blob(tensors=None, meta=None, checksums=True) -> bytes:
    """A file of `tensors`, labelled this version (the last one without provenance unless they hold documents)."""
    tensors = tensors or megabatch()
    version = FORMAT_VERSION if "documents" in tensors else PROVENANCE_SINCE - 1
    meta = {"format": "activault", "format_version": str(version)} if meta is None else meta
    return b"".join(encode(tensors, meta, checksums=checksums))


def with_header(raw: dict, body: bytes) -> bytes:
    """A file from a header object and a body (the length prefix recomputed)."""
    h = json.dumps(raw).encode()
    return struct.pack("<Q", len(h)) + h + body


def split(b: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", b)
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want
    )


ZSTD_SMALL = codecs.Codec("zstd", chunk_bytes=256)  # `compressed()`: 8 chunks of 8 tokens (float32)


def compressed(version: str = str(PROVENANCE_SINCE - 1), dtype: torch.dtype = torch.float32) -> bytes:
    """A zstd file of states [4, 16, 8] labelled with format `version`."""
    meta = {"format": "activault", "format_version": version}
    return b"".join(encode(megabatch(dtype, rows=4, seq=16, d=8), meta, compression=ZSTD_SMALL))


def edit_codec(b: bytes, **change) -> bytes:
    """The file `b` with fields of its `states` codec description changed."""
    raw, body = split(b)
    described = json.loads(raw["__metadata__"]["codecs"])
    described["states"].update(change)
    raw["__metadata__"]["codecs"] = json.dumps(described)
    return with_header(raw, body)


def with_documents(rows=3, seq=5) -> dict[str, torch.Tensor]:
    t = megabatch(rows=rows, seq=seq)
    t["documents"] = torch.arange(rows, dtype=torch.int64).repeat_interleave(seq).view(rows, seq)
    return t
