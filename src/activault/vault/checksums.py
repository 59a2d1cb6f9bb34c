"""Checksums of a megabatch's tensors: xxh3-64 of each tensor's description and stored bytes.

The description (name, dtype, shape; a compressed tensor's decoded dtype and shape and codec, from
format version 3) is hashed with the bytes, so a header edited to read the same bytes another way
fails like a flipped bit. `encode` writes them (vault/megabatch.py), `check_checksums` checks them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import torch
import xxhash

from activault.errors import FormatError
from activault.vault import codec as codecs
from activault.vault.header import CHECKSUM, CODES, DESCRIBED_SINCE, Header

Buffer = bytes | bytearray | memoryview


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor must be contiguous and on the CPU")
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def checksum(
    name: str, dtype: torch.dtype, shape: Iterable[int], data: Buffer | Sequence[Buffer], codec: str = ""
) -> str:
    """A tensor's checksum as 16 hex digits: of its name, dtype and shape, then its bytes (in place).

    Hashing the description too means a header edited to read the same bytes as another dtype or
    shape fails the check like a flipped bit in the data does.

    Args:
        codec: a compressed tensor's codec description (`described`); `dtype` and `shape` are then
            the decoded ones.
    """
    tail = f"{codec}|" if codec else ""
    h = xxhash.xxh3_64(f"{name}|{CODES[dtype]}|{','.join(map(str, shape))}|{tail}".encode())
    for part in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        h.update(part)
    return f"{h.intdigest():016x}"


def described(packed: codecs.Packed) -> str:
    """A compressed tensor's codec description as its checksum covers it: canonical JSON."""
    return json.dumps(packed.entry(CODES[packed.dtype]), sort_keys=True, separators=(",", ":"))


def covers(
    version: int | None, dtype: torch.dtype, shape: Sequence[int], packed: codecs.Packed | None
) -> tuple[torch.dtype, Sequence[int], str]:
    """What a tensor's checksum describes: (dtype, shape, codec) under the rule of format `version`."""
    if packed is None or (version is not None and version < DESCRIBED_SINCE):
        return dtype, shape, ""  # raw, or a version 2 file: the stored description
    return packed.dtype, packed.shape, described(packed)


def check_checksums(header: Header, buf: bytes | bytearray | memoryview, url: str | None = None) -> bool:
    """Check every tensor's bytes in `buf` (the whole file) against the header's checksums.

    Returns False when the file has none to check (written before checksums, format version 1).
    Raises FormatError naming the file and the tensor whose bytes differ.
    """
    sums = header.checksums
    if not sums:
        return False
    mv = memoryview(buf).cast("B")
    url = url or header.url
    if mv.nbytes != header.size:
        raise FormatError(f"{url}: {mv.nbytes} bytes, the header describes {header.size}")
    for name, want in sums.items():
        a, b = header.byte_range(name)
        t = header.tensors[name]
        dtype, shape, codec = covers(header.version, t.dtype, t.shape, header.packed.get(name))
        got = checksum(name, dtype, shape, mv[a:b], codec)
        if got != want:
            raise FormatError(
                f"{url}: the bytes of tensor {name!r} do not match their checksum ({CHECKSUM} {got}, "
                f"stored {want}): the file (its bytes, or the header's description of them) was corrupted "
                "after it was written"
            )
    return True
