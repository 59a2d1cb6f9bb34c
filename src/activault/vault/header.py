"""A megabatch file's header: the format's constants, and `parse_header`, the one validator.

A file is `u64 header length | JSON header | raw tensor bytes`, the safetensors layout. The
header's `__metadata__` says what the file is (format, version, run, hook, machine, file index)
and holds a checksum of each tensor (vault/checksums.py); a compressed `states` is a uint8 tensor
described under `codecs` (vault/codec.py). `parse_header` is the one validator every reader uses,
on the header alone, before any tensor byte is fetched.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch

from activault import dtypes
from activault.errors import FormatError, NotFoundError
from activault.vault import codec as codecs
from activault.vault.norms import NORMS, NORMS_SINCE

if TYPE_CHECKING:
    from activault.storage.base import Entry, Store

FORMAT: Final = "activault"
# 1: states, input_ids, positions. 2: plus a checksum of each tensor in the header metadata.
# 3: a compressed tensor's checksum also covers its decoded dtype and shape and its codec
# description, so an edit of any of them fails like a flipped bit (docs/format.md, Checksums).
# 4: a `documents` tensor, each token's document ordinal in its machine's stream (provenance);
# required from 4 on, so it cannot be stripped from a file silently.
# 5: a `norms` tensor, each token's L2 norm (vault/norms.py), computed by `encode`; required from 5 on.
FORMAT_VERSION = 5
# The version each rule came with (a file follows the rules of the version it is labelled with).
CHECKSUMS_SINCE = 2
DESCRIBED_SINCE = 3
PROVENANCE_SINCE = 4
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
# Our headers are under 1 KiB; a larger one is not ours and is refused before the body is read.
MAX_HEADER = 1 << 20
# The first read of a file: its length prefix and, for our files, the whole header.
HEAD_READ = 4096
# xxh3_64 hashes ~30 GB/s on one core here (google-crc32c 8-17, zlib.crc32 4.5, memcpy 2.2),
# so checking a 64 MiB file costs ~2 ms; it reads the tensor's memory without copying it.
CHECKSUM = "xxh3_64"
CHECKSUM_KEY = "checksum."  # metadata key prefix: `checksum.states` = 16 hex digits
# Bounds that keep a hostile header from costing time or memory before it is rejected.
MAX_DIMS = 8
MAX_DIM = 1 << 48
REQUIRED = ("states", "input_ids", "positions")
# [rows, seq] int64: the token's document ordinal in its machine's document stream, -1 = padding.
DOCUMENTS = "documents"
# Header metadata key: JSON {tensor: codec description} of the compressed tensors (docs/format.md).
CODECS_KEY = "codecs"
# Tensors a codec applies to; ids and positions stay raw (verify reads them by range; 1% of bytes).
COMPRESSIBLE = ("states",)

# safetensors code -> torch dtype, from the one table (activault/dtypes.py).
DTYPES: dict[str, torch.dtype] = {code: dtypes.to_torch(code) for code in dtypes.CODES.values()}
CODES = {v: k for k, v in DTYPES.items()}
STATE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for code, dt in DTYPES.items()}


def is_megabatch(name: str) -> bool:
    """Whether a key names a megabatch file (ours, or the original's `.pt`)."""
    return name.endswith(SUFFIX) or name.endswith(LEGACY_SUFFIX)


def megabatch_files(entries: Iterable[Entry]) -> dict[str, int]:
    """Megabatch file name -> size, from a folder's listing (in listing order)."""
    return {e.key.rsplit("/", 1)[-1]: e.size for e in entries if is_megabatch(e.key)}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: dtype, shape and its bytes [start, end) counted from the data start."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated megabatch header: `states [rows, seq, d]`, `input_ids` and `positions [rows, seq]`."""

    url: str
    tensors: dict[str, TensorInfo]  # as stored (a compressed tensor: uint8 [bytes])
    metadata: dict[str, str]
    data_offset: int  # bytes before the first tensor: 8 + the JSON header
    packed: dict[str, codecs.Packed] = field(default_factory=dict)  # the compressed tensors

    def logical(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A tensor's dtype and shape once decoded (a compressed one's original dtype and shape)."""
        p = self.packed.get(name)
        if p is not None:
            return p.dtype, tuple(p.shape)
        return self.tensors[name].dtype, self.tensors[name].shape

    @functools.cached_property  # decode checks it per file; the dict is never changed after parsing
    def size(self) -> int:
        """The file's length in bytes."""
        return self.data_offset + max((t.end for t in self.tensors.values()), default=0)

    @property
    def rows(self) -> int:
        return self.logical("states")[1][0]

    @property
    def seq_len(self) -> int:
        return self.logical("states")[1][1]

    @property
    def d_model(self) -> int:
        return self.logical("states")[1][2]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of `states` (decoded)."""
        return self.logical("states")[0]

    @property
    def version(self) -> int | None:
        """The activault format version, None for a safetensors file from elsewhere."""
        v = self.metadata.get("format_version")
        return int(v) if v is not None else None

    @property
    def checksums(self) -> dict[str, str]:
        """Tensor name -> stored checksum (hex); empty for files written before checksums."""
        n = len(CHECKSUM_KEY)
        return {k[n:]: v for k, v in self.metadata.items() if k.startswith(CHECKSUM_KEY)}

    def byte_range(self, name: str) -> tuple[int, int]:
        """Where tensor `name` lies in the file: [start, end)."""
        t = self.tensors[name]
        return self.data_offset + t.start, self.data_offset + t.end


def header_length(first8: bytes | bytearray | memoryview, url: str) -> int:
    """Bytes of length prefix plus JSON header, from the file's first 8 bytes."""
    if len(first8) < 8:
        raise FormatError(f"{url}: truncated file ({len(first8)} bytes, not even a header length)")
    (n,) = struct.unpack_from("<Q", first8, 0)
    if not 2 <= n <= MAX_HEADER:
        raise FormatError(
            f"{url}: not a megabatch: corrupted or truncated header (it declares {n} bytes; ours are under 1 KiB)"
        )
    return 8 + n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


# Made once: json.loads with a hook builds a new decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_HEX = "0123456789abcdef"


def _tensor_info(name: str, entry: Any, url: str) -> TensorInfo:
    """One header entry, checked for types and bounds before any arithmetic on it."""
    if not isinstance(entry, dict) or entry.keys() != _ENTRY_KEYS:
        raise _bad_entry(url, name, "needs exactly dtype, shape, data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _bad_entry(url, name, f"unknown dtype {str(code)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not _ints(shape, MAX_DIM):
        raise _bad_entry(url, name, f"shape must be at most {MAX_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not _ints(offsets, 1 << 62):
        raise _bad_entry(url, name, "data_offsets must be two non-negative integers")
    start, end = offsets
    if end - start != math.prod(shape) * ITEMSIZE[code]:
        raise _bad_entry(url, name, f"shape {shape} {code} does not fill bytes [{start}, {end})")
    return TensorInfo(DTYPES[code], tuple(shape), start, end)


def _strings(values: Iterable[Any]) -> bool:
    for v in values:
        if not isinstance(v, str):
            return False
    return True


def _bad_entry(url: str, name: str, why: str) -> FormatError:
    return FormatError(f"{url}: corrupted header entry for tensor {name!r} ({why})")


def _ints(xs: list[Any], bound: int) -> bool:
    """Every item an int (not a bool) in [0, bound); a plain loop (all() over a generator resumes a frame per item)."""
    for x in xs:
        if type(x) is not int or not 0 <= x < bound:
            return False
    return True


def _check_layout(tensors: dict[str, TensorInfo], data_len: int, url: str) -> None:
    """Tensors lie back to back from byte 0 and cover the data exactly, as safetensors requires."""
    at = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != at:
            what = "overlaps the tensor before it" if t.start < at else f"leaves a gap at byte {at}"
            raise FormatError(f"{url}: corrupted header (tensor {name!r} {what})")
        at = t.end
    if at > data_len:
        raise FormatError(f"{url}: truncated file (the tensors need {at} data bytes, the file has {data_len})")
    if at < data_len:
        raise FormatError(f"{url}: {data_len - at} unexpected bytes after the tensors (corrupted file)")


def _check_tensors(tensors: dict[str, TensorInfo], url: str, version: int | None) -> None:
    """states [rows, seq, d] floating point; input_ids and positions [rows, seq] int32; documents
    [rows, seq] int64, required from format version 4 on and refused before it; norms [rows, seq]
    float32, the same from version 5."""
    missing = [n for n in REQUIRED if n not in tensors]
    if missing:
        raise FormatError(f"{url}: no {', '.join(map(repr, missing))} tensor; not an activault megabatch")
    states, ids, pos = (tensors[n] for n in REQUIRED)
    if len(states.shape) != 3 or states.dtype not in STATE_DTYPES:
        raise FormatError(
            f"{url}: 'states' is {list(states.shape)} {dtypes.name(states.dtype)}, "
            "expected [rows, seq, d] floating point"
        )
    for name, t in (("input_ids", ids), ("positions", pos)):
        if t.shape != states.shape[:2] or t.dtype != torch.int32:
            raise FormatError(
                f"{url}: {name!r} is {list(t.shape)} {dtypes.name(t.dtype)}, "
                f"expected {list(states.shape[:2])} int32 like 'states'"
            )
    if 0 in states.shape:
        raise FormatError(f"{url}: holds no data (states {list(states.shape)}); activault never writes one")
    for name, since, dtype in ((DOCUMENTS, PROVENANCE_SINCE, torch.int64), (NORMS, NORMS_SINCE, torch.float32)):
        _check_since(tensors.get(name), name, since, dtype, states.shape[:2], url, version)


def _check_since(
    t: TensorInfo | None,
    name: str,
    since: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    url: str,
    version: int | None,
) -> None:
    """A per-token tensor that came with format version `since`: required from it on, refused before it."""
    if t is None:
        if version is not None and version >= since:
            raise FormatError(
                f"{url}: labelled format version {version} but has no {name!r} tensor (every file of "
                f"that version has one): the file was edited or damaged after it was written"
            )
        return
    if version is not None and version < since:
        raise FormatError(
            f"{url}: corrupted header (labelled format version {version}, which has no {name!r} tensor, yet "
            "it holds one)"
        )
    if t.shape != shape or t.dtype != dtype:
        raise FormatError(
            f"{url}: {name!r} is {list(t.shape)} {dtypes.name(t.dtype)}, "
            f"expected {list(shape)} {dtypes.name(dtype)} like 'states'"
        )


def _check_metadata(meta: Any, tensors: dict[str, TensorInfo], url: str) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not _strings(meta.values()):
        raise FormatError(f"{url}: corrupted header (__metadata__ must map names to strings)")
    label = meta.get("format_version")
    version = None
    if label is not None:
        if not (label.isascii() and label.isdigit() and len(label) < 6 and int(label) >= 1):
            raise FormatError(f"{url}: corrupted header (format_version {label[:20]!r})")
        version = int(label)
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{url}: written by a newer activault (format version {label}, this one reads "
                f"up to {FORMAT_VERSION}); upgrade activault"
            )
    sums = {k: v for k, v in meta.items() if k.startswith(CHECKSUM_KEY)}
    algorithm = meta.get("checksum")
    if version is not None and version < CHECKSUMS_SINCE:
        held = ["checksums"] * bool(sums or algorithm is not None) + ["compressed tensors"] * (CODECS_KEY in meta)
        if held:
            # Version 1 had neither: such a label on them is an edit (it would switch checks off).
            raise FormatError(
                f"{url}: corrupted header (labelled format version {label}, which has no checksums or "
                f"compressed tensors, yet it holds {' and '.join(held)})"
            )
    if sums or algorithm is not None or (version is not None and version >= CHECKSUMS_SINCE):
        if algorithm != CHECKSUM:
            raise FormatError(
                f"{url}: header names checksum {str(algorithm)[:20]!r}, expected {CHECKSUM!r} "
                "(corrupted header, or a newer activault: upgrade)"
            )
        for name in tensors:
            v = sums.get(CHECKSUM_KEY + name)
            if v is None or len(v) != 16 or v.strip(_HEX):  # strip leaves '' iff every digit is hex
                raise FormatError(f"{url}: corrupted header (no valid checksum for tensor {name!r})")
        if len(sums) != len(tensors):
            raise FormatError(f"{url}: corrupted header (checksums for tensors it does not hold)")
    return meta  # the decoder's own dict: nothing else holds it


def parse_header(buf: bytes | bytearray | memoryview, url: str, size: int | None = None) -> Header:
    """Validate a megabatch header (every reader's one check) and return it.

    Args:
        buf: the file's first bytes, at least the length prefix and the whole JSON header.
        size: the file's length in bytes (default: `len(buf)`, the whole file).
    Raises FormatError naming `url` for anything but a complete, consistent megabatch.
    """
    mv = memoryview(buf).cast("B")
    start = header_length(mv[:8], url)
    if mv.nbytes < start:
        raise FormatError(f"{url}: truncated file (header needs {start} bytes, got {mv.nbytes})")
    size = mv.nbytes if size is None else size
    try:
        raw = _DECODER.decode(str(mv[8:start], "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{url}: corrupted header (not JSON: {str(e)[:80]})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{url}: corrupted header (not a JSON object)")
    tensors = {n: _tensor_info(n, e, url) for n, e in raw.items() if n != "__metadata__"}
    _check_layout(tensors, size - start, url)
    meta = _check_metadata(raw.get("__metadata__"), tensors, url)
    packed = _packed(meta, tensors, url)
    logical = (
        {
            n: TensorInfo(packed[n].dtype, tuple(packed[n].shape), t.start, t.end) if n in packed else t
            for n, t in tensors.items()
        }
        if packed
        else tensors
    )
    version = meta.get("format_version")
    _check_tensors(logical, url, int(version) if version is not None else None)
    return Header(url, tensors, meta, start, packed)


def _packed(meta: dict[str, str], tensors: dict[str, TensorInfo], url: str) -> dict[str, codecs.Packed]:
    """The compressed tensors the metadata describes, checked against how they are stored."""
    raw = meta.get(CODECS_KEY)
    if raw is None:
        return {}
    try:
        described = json.loads(raw)
        if not isinstance(described, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError):
        raise FormatError(f"{url}: corrupted codec description in the header") from None
    out = {}
    for name, desc in described.items():
        t = tensors.get(name)
        if name not in COMPRESSIBLE or t is None or t.dtype != torch.uint8 or len(t.shape) != 1:
            raise FormatError(f"{url}: the header's codecs name {str(name)[:40]!r}, not a uint8 blob")
        out[name] = codecs.parse(desc, t.nbytes, DTYPES, f"{url} {name!r}")
    return out


def fetch_header(store: Store, key: str, size: int | None = None) -> Header:
    """A stored file's validated header from one small read (two for a header over 4 KiB).

    Args:
        size: the file's length from a listing (else one more request asks the store).
    """
    url = store.url(key)
    if size is None:
        size = store.size(key)
        if size is None:
            raise NotFoundError(f"{url} does not exist")
    if size < 8:  # also spares the store an empty ranged read, which S3 refuses
        raise FormatError(f"{url}: truncated file ({size} bytes, not even a header length)")
    head = store.get_range(key, 0, min(size, HEAD_READ))
    n = header_length(head[:8], url)
    if n > head.nbytes and n <= size:
        head = store.get_range(key, 0, n)
    return parse_header(head, url, size)
