"""The megabatch file format: safetensors, written from tensor memory without copies, validated on read.

A file is `u64 header length | JSON header | raw tensor bytes`, the safetensors layout, so
`safetensors.safe_open` reads our files and we read theirs. The header's `__metadata__` says what
the file is (format, version, run, hook, machine, file index) and holds a checksum of each
tensor's stored bytes and of what they mean (dtype, shape; for a compressed tensor, from format
version 3, its decoded dtype and shape and its codec description); a compressed `states` is a
uint8 tensor described under `codecs` (vault/codec.py).
`parse_header` is the one validator every reader uses, on the header alone, before
any tensor byte is fetched. Nothing is ever unpickled: legacy `.pt` files of the original project
load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch
import xxhash

from activault import dtypes
from activault.errors import FormatError, NotFoundError
from activault.vault import codec as codecs
from activault.vault.norms import NORMS, NORMS_SINCE, token_norms

if TYPE_CHECKING:
    from activault.storage.base import Entry, Store

Buffer = bytes | bytearray | memoryview

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


# ---- the header ----------------------------------------------------------------------------------


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

    @property
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


def _tensor_info(name: str, entry: Any, url: str) -> TensorInfo:
    """One header entry, checked for types and bounds before any arithmetic on it."""
    bad = f"{url}: corrupted header entry for tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{bad} (needs exactly dtype, shape, data_offsets)")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise FormatError(f"{bad} (unknown dtype {str(code)[:20]!r})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(s, MAX_DIM) for s in shape):
        raise FormatError(f"{bad} (shape must be at most {MAX_DIMS} non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o, 1 << 62) for o in offsets):
        raise FormatError(f"{bad} (data_offsets must be two non-negative integers)")
    start, end = offsets
    if end - start != math.prod(shape) * ITEMSIZE[code]:
        raise FormatError(f"{bad} (shape {shape} {code} does not fill bytes [{start}, {end}))")
    return TensorInfo(DTYPES[code], tuple(shape), start, end)


def _is_int(x: Any, bound: int) -> bool:
    return type(x) is int and 0 <= x < bound


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
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{url}: corrupted header (__metadata__ must map names to strings)")
    version = meta.get("format_version")
    if version is not None:
        if not (version.isascii() and version.isdigit() and len(version) < 6 and int(version) >= 1):
            raise FormatError(f"{url}: corrupted header (format_version {version[:20]!r})")
        if int(version) > FORMAT_VERSION:
            raise FormatError(
                f"{url}: written by a newer activault (format version {version}, this one reads "
                f"up to {FORMAT_VERSION}); upgrade activault"
            )
    sums = {k: v for k, v in meta.items() if k.startswith(CHECKSUM_KEY)}
    algorithm = meta.get("checksum")
    held = ["checksums"] * bool(sums or algorithm is not None) + ["compressed tensors"] * (CODECS_KEY in meta)
    if version is not None and int(version) < CHECKSUMS_SINCE and held:
        # Version 1 had neither: such a label on them is an edit (it would switch checks off).
        raise FormatError(
            f"{url}: corrupted header (labelled format version {version}, which has no checksums or "
            f"compressed tensors, yet it holds {' and '.join(held)})"
        )
    if sums or algorithm is not None or (version is not None and int(version) >= CHECKSUMS_SINCE):
        if algorithm != CHECKSUM:
            raise FormatError(
                f"{url}: header names checksum {str(algorithm)[:20]!r}, expected {CHECKSUM!r} "
                "(corrupted header, or a newer activault: upgrade)"
            )
        for name in tensors:
            v = sums.get(CHECKSUM_KEY + name)
            if v is None or len(v) != 16 or not all(c in "0123456789abcdef" for c in v):
                raise FormatError(f"{url}: corrupted header (no valid checksum for tensor {name!r})")
        if len(sums) != len(tensors):
            raise FormatError(f"{url}: corrupted header (checksums for tensors it does not hold)")
    return dict(meta)


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
        raw = json.loads(bytes(mv[8:start]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{url}: corrupted header (not JSON: {str(e)[:80]})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{url}: corrupted header (not a JSON object)")
    tensors = {n: _tensor_info(n, e, url) for n, e in raw.items() if n != "__metadata__"}
    _check_layout(tensors, size - start, url)
    meta = _check_metadata(raw.get("__metadata__"), tensors, url)
    packed = _packed(meta, tensors, url)
    logical = {
        n: TensorInfo(packed[n].dtype, tuple(packed[n].shape), t.start, t.end) if n in packed else t
        for n, t in tensors.items()
    }
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


# ---- writing -------------------------------------------------------------------------------------


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


def _covers(
    version: int | None, dtype: torch.dtype, shape: Sequence[int], packed: codecs.Packed | None
) -> tuple[torch.dtype, Sequence[int], str]:
    """What a tensor's checksum describes: (dtype, shape, codec) under the rule of format `version`."""
    if packed is None or (version is not None and version < DESCRIBED_SINCE):
        return dtype, shape, ""  # raw, or a version 2 file: the stored description
    return packed.dtype, packed.shape, described(packed)


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
    """
    meta = {k: str(v) for k, v in metadata.items()}
    label = meta.get("format_version")
    version = int(label) if label is not None and label.isdigit() else None
    tensors = {n: t for n, t in tensors.items() if n != NORMS}
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
            dt, sh, codec = _covers(version, dtype, shape, packed.get(n))
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
        dtype, shape, codec = _covers(header.version, t.dtype, t.shape, header.packed.get(name))
        got = checksum(name, dtype, shape, mv[a:b], codec)
        if got != want:
            raise FormatError(
                f"{url}: the bytes of tensor {name!r} do not match their checksum ({CHECKSUM} {got}, "
                f"stored {want}): the file (its bytes, or the header's description of them) was corrupted "
                "after it was written"
            )
    return True


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
        threads: where compressed chunks decode (default: the process-wide `codec.decode_pool()`;
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
    for name, t in header.tensors.items():
        a, b = header.byte_range(name)
        raw = data[a:b]
        if name in header.packed:
            out[name] = codecs.unpack(raw.numpy().data, header.packed[name], f"{url} {name!r}", empty, threads)
            continue
        if a % t.dtype.itemsize:  # not aligned (not written by activault): one copy
            raw = raw.clone()
        out[name] = raw.view(t.dtype).view(t.shape)
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
