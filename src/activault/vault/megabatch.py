"""The megabatch file format: safetensors, written from tensor memory without copies, decoded as views.

A file is `u64 header length | JSON header | raw tensor bytes`, the safetensors layout, so
`safetensors.safe_open` reads our files and we read theirs. The header and its one validator,
`parse_header`, are in vault/header.py, the tensors' checksums in vault/checksums.py; this module
encodes and decodes files (and re-exports the names readers use, so `megabatch` stays the one
import). Nothing is ever unpickled: legacy `.pt` files of the original project load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from activault.errors import FormatError
from activault.vault import codec as codecs
from activault.vault.checksums import Buffer, check_checksums, checksum, covers, described, tensor_bytes
from activault.vault.header import (
    CHECKSUM,
    CHECKSUM_KEY,
    CHECKSUMS_SINCE,
    CODECS_KEY,
    CODES,
    COMPRESSIBLE,
    DESCRIBED_SINCE,
    DOCUMENTS,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    HEAD_READ,
    ITEMSIZE,
    LEGACY_SUFFIX,
    MAX_DIM,
    MAX_DIMS,
    MAX_HEADER,
    PROVENANCE_SINCE,
    REQUIRED,
    STATE_DTYPES,
    SUFFIX,
    Header,
    TensorInfo,
    fetch_header,
    header_length,
    is_megabatch,
    megabatch_files,
    parse_header,
)
from activault.vault.norms import NORMS, NORMS_SINCE, token_norms

__all__ = [
    "CHECKSUM",
    "CHECKSUM_KEY",
    "CHECKSUMS_SINCE",
    "CODECS_KEY",
    "CODES",
    "COMPRESSIBLE",
    "DESCRIBED_SINCE",
    "DOCUMENTS",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "HEAD_READ",
    "ITEMSIZE",
    "LEGACY_SUFFIX",
    "MAX_DIM",
    "MAX_DIMS",
    "MAX_HEADER",
    "NORMS",
    "NORMS_SINCE",
    "PROVENANCE_SINCE",
    "REQUIRED",
    "STATE_DTYPES",
    "SUFFIX",
    "Alloc",
    "Buffer",
    "Cursor",
    "Header",
    "Megabatch",
    "TensorInfo",
    "check_checksums",
    "check_provenance",
    "check_shuffled_provenance",
    "checksum",
    "decode",
    "decode_legacy",
    "described",
    "encode",
    "fetch_header",
    "header_length",
    "is_megabatch",
    "megabatch_files",
    "parse_header",
    "relabelled",
    "tensor_bytes",
]


def relabelled(metadata: Mapping[str, str]) -> dict[str, str]:
    """A file's metadata labelled with this format version, for a file rewritten under its rules;
    one labelled before provenance (no `documents`) gets the last version without it."""
    label = metadata.get("format_version")
    old = label is not None and label.isdigit() and int(label) < PROVENANCE_SINCE
    return {**metadata, "format_version": str(PROVENANCE_SINCE - 1 if old else FORMAT_VERSION)}


def encode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    checksums: bool = True,
    compression: codecs.Codec | None = None,
) -> list[memoryview]:
    """The file as buffers: the header, then each tensor's memory (raw tensors are not copied).

    Args:
        checksums: store each stored tensor's checksum in the header (what `check_checksums` verifies),
            under the rule of the format version `metadata` labels the file with (default: this one's).
        compression: store `states` as a uint8 tensor of zstd frames, described in the header
            metadata under `codecs` (docs/format.md); the file stays a valid safetensors file.

    A file labelled format version 5 or later gets `norms`, each token's L2 norm computed here from
    the values it stores (vault/norms.py); a `norms` tensor passed in is never stored as given.
    Padding tokens (position -1) are stored with zero states, whatever `states` holds there.
    """
    meta = {k: str(v) for k, v in metadata.items()}
    label = meta.get("format_version")
    version = int(label) if label is not None and label.isdigit() else None
    tensors = {n: t for n, t in tensors.items() if n != NORMS}
    if "states" in tensors and "positions" in tensors:
        tensors["states"] = padding_zeroed(tensors["states"], tensors["positions"])
    # name -> (dtype, shape, buffers) as stored
    stored: dict[str, tuple[torch.dtype, list[int], list[memoryview]]] = {}
    packed: dict[str, codecs.Packed] = {}
    for name, t in tensors.items():
        if compression is not None and name in COMPRESSIBLE:
            p, frames = codecs.pack(t, compression)
            packed[name] = p
            stored[name] = (torch.uint8, [sum(p.chunks)], [memoryview(f) for f in frames])
        else:
            stored[name] = (t.dtype, list(t.shape), [tensor_bytes(t)])
    if version is not None and version >= NORMS_SINCE and "states" in tensors:
        norms = token_norms(_stored_values(tensors["states"], packed.get("states"), stored["states"][2], compression))
        stored[NORMS] = (norms.dtype, list(norms.shape), [tensor_bytes(norms)])
    if packed:
        entries = {n: p.entry(CODES[p.dtype]) for n, p in packed.items()}
        meta[CODECS_KEY] = json.dumps(entries, separators=(",", ":"))
    # Widest items first keeps every tensor aligned to its item size after an 8-aligned header.
    names = sorted(stored, key=lambda n: -stored[n][0].itemsize)
    if checksums:
        # The rule of the version the caller labels the file with (none: this version's).
        meta["checksum"] = CHECKSUM
        for n in names:
            dtype, shape, bufs = stored[n]
            dt, sh, codec = covers(version, dtype, shape, packed.get(n))
            meta[CHECKSUM_KEY + n] = checksum(n, dt, sh, bufs, codec)
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name in names:
        dtype, shape, bufs = stored[name]
        nbytes = sum(b.nbytes for b in bufs)
        header[name] = {"dtype": CODES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [memoryview(struct.pack("<Q", len(raw)) + raw)] + [b for n in names for b in stored[n][2]]


def padding_zeroed(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`states` ([rows, seq, d]) with every padding token's (position -1) values zero, as the format
    stores padding: the same tensor when they are (a collection's padding), else a copy (e.g. a
    SAELens cache's values at the positions its export listed as padding), never written into."""
    if not padding_values(states, positions):
        return states
    out = states.clone()
    out[positions < 0] = 0
    return out


def padding_values(states: torch.Tensor, positions: torch.Tensor) -> int:
    """How many padding tokens (position -1) of `states` hold other bits than +0.0's (-0.0 too)."""
    pad = positions < 0
    if not bool(pad.any()):
        return 0
    held = states[pad]
    if held.numel() == 0:  # no values to hold (a width of 0)
        return 0
    return int(held.view(torch.uint8).reshape(held.shape[0], -1).any(1).sum())


def _stored_values(
    states: torch.Tensor, packed: codecs.Packed | None, frames: Sequence[memoryview], codec: codecs.Codec | None
) -> torch.Tensor:
    """The states a file stores: as given, or as a lossy codec (fp8) decodes them."""
    if packed is None or codec is None or codec.lossless:
        return states
    return codecs.unpack(b"".join(frames), packed, "states")


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Megabatch:
    """A decoded file: its tensors (views of the read buffer) and its header (None for legacy .pt)."""

    tensors: dict[str, torch.Tensor]
    header: Header | None

    @property
    def states(self) -> torch.Tensor:
        """[rows, seq, d]"""
        return self.tensors["states"]

    @property
    def input_ids(self) -> torch.Tensor:
        """[rows, seq] int32 (legacy files: as stored)"""
        return self.tensors["input_ids"]

    @property
    def positions(self) -> torch.Tensor | None:
        """[rows, seq] int32, the token's index in its document, -1 = padding; None in legacy files."""
        return self.tensors.get("positions")

    @property
    def documents(self) -> torch.Tensor | None:
        """[rows, seq] int64, the token's document ordinal in its machine's stream, -1 = padding;
        None in files written before provenance (format version 3 and older, legacy files)."""
        return self.tensors.get(DOCUMENTS)

    @property
    def norms(self) -> torch.Tensor | None:
        """[rows, seq] float32, each token's L2 norm (vault/norms.py); None in files written before
        format version 5."""
        return self.tensors.get(NORMS)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata if self.header is not None else {}


# (document ordinal, position) of the last real token of a machine's files so far.
Cursor = tuple[int, int]


def check_provenance(
    documents: torch.Tensor, positions: torch.Tensor, url: str, after: Cursor | None = None
) -> Cursor | None:
    """Check a file's provenance in collection order (row-major) and return its last real token's
    (document, position), or `after` when it holds none.

    Padding is -1 in both tensors and only ends the file; each document's tokens are contiguous
    with positions increasing (cleaning may skip some), ordinals never decrease, also from `after`
    (the previous file of the machine). FormatError naming the file and the first bad token.
    """
    docs, pos, n, where = _real_tokens(documents, positions, url, "a machine's data")
    if n == 0:
        return after
    d, p = docs[:n], pos[:n]
    prev_d, prev_p = d[:-1], p[:-1]
    if after is not None:
        prev_d = torch.cat([torch.tensor([after[0]]), prev_d])
        prev_p = torch.cat([torch.tensor([after[1]]), prev_p])
        d_next, p_next = d, p
    else:
        d_next, p_next = d[1:], p[1:]
    bad = (d_next < prev_d) | ((d_next == prev_d) & (p_next <= prev_p))
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        i = j if after is not None else j + 1
        raise FormatError(
            f"{url}: provenance out of order at {where(i)}: document {int(d_next[j])} position "
            f"{int(p_next[j])} follows document {int(prev_d[j])} position {int(prev_p[j])} (documents "
            "never decrease and a document's positions increase, in collection order); the file is damaged"
        )
    return int(d[-1]), int(p[-1])


def _real_tokens(
    documents: torch.Tensor, positions: torch.Tensor, url: str, ends: str
) -> tuple[torch.Tensor, torch.Tensor, int, Callable[[int], str]]:
    """(documents, positions flattened, real tokens n, where(i)) once padding is checked: -1 in both
    tensors, in neither for a real token, and only after the n real tokens (it only ends `ends`)."""
    docs, pos = documents.reshape(-1), positions.reshape(-1).to(torch.int64)
    seq = positions.shape[-1] if positions.dim() else 1

    def where(i: int) -> str:
        return f"row {i // seq}, column {i % seq}"

    pad = docs < 0
    odd = (pad != (pos < 0)) | (docs < -1)
    if bool(odd.any()):
        i = int(odd.nonzero()[0])
        raise FormatError(
            f"{url}: provenance of {where(i)} is document {int(docs[i])}, position {int(pos[i])}: padding "
            "is -1 in both and a real token in neither; the file is damaged"
        )
    n = int((~pad).sum())
    if bool(pad[:n].any()):
        i = int(pad.nonzero()[0])
        raise FormatError(f"{url}: padding at {where(i)} before real tokens: padding only ends {ends}")
    return docs, pos, n, where


def check_shuffled_provenance(documents: torch.Tensor, positions: torch.Tensor, url: str) -> bool:
    """Check a shuffled run's file (its cfg.json says so, never the file): padding is -1 in both
    tensors and only ends the file, and no (document, position) occurs twice. Returns whether it
    is padded. FormatError naming the file and the first bad token."""
    docs, pos, n, where = _real_tokens(documents, positions, url, "a shuffled run")
    pairs = torch.stack([docs[:n], pos[:n]], 1)
    unique, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
    if unique.shape[0] != n:
        i = int((counts[inverse] > 1).nonzero()[0])
        raise FormatError(
            f"{url}: document {int(docs[i])} position {int(pos[i])} occurs more than once (first at {where(i)}): "
            "a shuffle moves each token once; the file is damaged"
        )
    return n < docs.numel()


# A buffer for a decoded (decompressed) tensor: `alloc(shape, dtype)`; readers pass their recycled
# or pinned buffers (reading/fetch.py ReadBuffers.empty).
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def decode(
    buf: bytes | bytearray | memoryview | torch.Tensor,
    url: str,
    header: Header | None = None,
    verify_checksums: bool = False,
    alloc: Alloc | None = None,
    threads: codecs.Threads = None,
) -> Megabatch:
    """One whole megabatch file's tensors: every reader's one decoder.

    Raw tensors are views of `buf` (no copy, unless a foreign file stores one unaligned);
    compressed ones (vault/codec.py) are decoded into `alloc`'s buffers. A `.pt` url is a legacy
    file (`decode_legacy`).

    Args:
        buf: the file's bytes, or a `[size] uint8` CPU tensor over them (a reader's buffer: the
            tensors are then slices of that tensor, so a non_blocking copy from pinned memory
            keeps the memory's allocation alive until the copy is done).
        header: the file's header when already fetched and validated (`fetch_header`,
            `parse_header`); else it is parsed from `buf`.
        verify_checksums: check each tensor's bytes against the header (FormatError if they differ).
        alloc: allocates a decoded tensor's buffer (default: `torch.empty`).
        threads: where compressed chunks decode (default: the process-wide `codec_pool.decode_pool()`;
            an executor, or a thread count).
    """
    data: torch.Tensor | None = None
    if isinstance(buf, torch.Tensor):
        data, mv = buf, buf.numpy().data
    else:
        mv = memoryview(buf).cast("B")
    if url.endswith(LEGACY_SUFFIX):
        return decode_legacy(mv, url)
    if header is None:
        header = parse_header(mv, url)
    elif mv.nbytes != header.size:
        raise FormatError(f"{url}: {mv.nbytes} bytes, the header describes {header.size}")
    if verify_checksums:
        check_checksums(header, mv, url)
    if data is None:
        # Object-store buffers are read-only (torch warns); tensors over them are only ever read.
        # catch_warnings swaps the process-wide filters, so it is entered only when needed: readers'
        # own buffers are writable, and a reader thread inside it would hide other threads' warnings.
        with warnings.catch_warnings() if mv.readonly else contextlib.nullcontext():
            if mv.readonly:
                warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(mv, dtype=torch.uint8)  # not empty: it holds a valid header

    def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype) if alloc is None else alloc(tuple(shape), dtype)

    out = {}
    storage, offset = data.untyped_storage(), data.storage_offset()
    for name, t in header.tensors.items():
        a, b = header.byte_range(name)
        if name in header.packed:
            out[name] = codecs.unpack(data[a:b].numpy().data, header.packed[name], f"{url} {name!r}", empty, threads)
        elif (offset + a) % t.dtype.itemsize == 0:
            # The tensor over the buffer's own storage in one call (a slice and two views cost three
            # dispatches, a third of decode's time): it keeps the allocation alive as a slice does.
            out[name] = torch.empty(0, dtype=t.dtype).set_(storage, (offset + a) // t.dtype.itemsize, t.shape, ())
        else:  # not aligned (not written by activault): one copy
            out[name] = data[a:b].clone().view(t.dtype).view(t.shape)
    return Megabatch(out, header)


def decode_legacy(buf: bytes | bytearray | memoryview, url: str) -> Megabatch:
    """A megabatch of the original project (`torch.save`d dict), loaded without running pickled code.

    It has `states [rows, seq, d]` and `input_ids [rows, seq]` but no positions (`Megabatch.positions`
    is None): readers that need them treat every token as real.
    """
    try:
        obj = torch.load(io.BytesIO(bytes(buf)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise FormatError(f"{url}: not a loadable tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{url}: legacy file holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    states, ids = tensors.get("states"), tensors.get("input_ids")
    if states is None or states.dim() != 3 or not states.is_floating_point() or 0 in states.shape:
        raise FormatError(f"{url}: legacy file has no 'states' tensor of shape [rows, seq, d]")
    if ids is None or tuple(ids.shape) != tuple(states.shape[:2]):
        raise FormatError(f"{url}: legacy file has no 'input_ids' tensor of shape {list(states.shape[:2])}")
    tensors.pop("positions", None)  # the original never wrote them; never trust a stray one
    return Megabatch(tensors, None)
