"""Files as other writers would leave them: a run's files rewritten as format version 4 (no norms),
a file whose norms lie under a valid checksum (a buggy writer), and files whose padding holds values
(an `activault import` of an earlier version)."""

from __future__ import annotations

import json
import struct
from unittest import mock

import torch

from activault.storage import Store
from activault.storage.base import join
from activault.vault import megabatch as fmt
from activault.vault.norms import NORMS


def as_format_4(store: Store, run: str, hooks: list[str], names: list[str]) -> None:
    """Each file of `run` rewritten as format version 4 writes it: the same tensors, no norms."""
    for h in hooks:
        for name in names:
            key = join(run, h, name)
            mb = fmt.decode(store.get(key), store.url(key), verify_checksums=True)
            meta = {k: v for k, v in mb.metadata.items() if k != "checksum" and not k.startswith(fmt.CHECKSUM_KEY)}
            store.put(key, fmt.encode(mb.tensors, {**meta, "format_version": "4"}))


def with_padding_values(store: Store, run: str, hooks: list[str], names: list[str], value: float) -> None:
    """Each file rewritten with `value` in its padding tokens' states (checksums and norms match them),
    as an import that kept a cache's values at padding wrote it."""
    for h in hooks:
        for name in names:
            key = join(run, h, name)
            mb = fmt.decode(store.get(key), store.url(key), verify_checksums=True)
            tensors = {k: t.clone() for k, t in mb.tensors.items()}
            tensors["states"][tensors["positions"] < 0] = value
            meta = {k: v for k, v in mb.metadata.items() if k != "checksum" and not k.startswith(fmt.CHECKSUM_KEY)}
            with mock.patch.object(fmt, "padding_zeroed", lambda states, positions: states):
                store.put(key, fmt.encode(tensors, meta))


def lying_norms(data: bytes, url: str, edit: tuple[int, int, float]) -> bytes:
    """The file `data` with stored norm (row, column) set to a value, its checksum written to match."""
    header = fmt.parse_header(data, url)
    a, b = header.byte_range(NORMS)
    body = bytearray(data)
    norms = torch.frombuffer(body[a:b], dtype=torch.float32).view(header.tensors[NORMS].shape).clone()
    row, col, value = edit
    norms[row, col] = value
    body[a:b] = norms.numpy().tobytes()
    raw = json.loads(bytes(data[8 : header.data_offset]))
    info = header.tensors[NORMS]
    raw["__metadata__"][fmt.CHECKSUM_KEY + NORMS] = fmt.checksum(NORMS, info.dtype, info.shape, body[a:b])
    text = json.dumps(raw, separators=(",", ":")).encode()
    text += b" " * (header.data_offset - 8 - len(text))  # the same length: tensor offsets unchanged
    assert len(text) == header.data_offset - 8
    return struct.pack("<Q", len(text)) + text + bytes(body[header.data_offset :])
