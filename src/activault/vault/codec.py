"""Compression of stored states: byte planes + zstd in independent chunks, and an opt-in lossy fp8.

A tensor `[..., d]` is cut into chunks of whole tokens (rows of `d`), each compressed on its own
into one zstd frame, so chunks compress and decompress on several threads (zstd releases the
GIL) and a ranged read can fetch and decode any one chunk. Within a chunk the elements' bytes
are regrouped into planes: every element's byte 0, then every byte 1, ... The high byte of a
bf16 (sign, exponent) is very redundant and the low byte nearly random; apart they compress to
~0.69 of raw on real activations, together to ~0.79. The exact layout is in docs/format.md.

- `zstd`: lossless; decoding gives back the same bits.
- `fp8`: lossy and opt-in: each token is scaled by its largest finite magnitude / 448 (a float32
  per token) and rounded to float8 e4m3, then stored as above: ~0.43 of bf16's bytes, a relative
  error per token of 2.5% on average and 3.2% at most on real activations (bench/compression.py).
  A NaN stays NaN and an Inf becomes NaN (e4m3fn has no Inf): a non-finite value stays non-finite.
  e4m3 rather than int8: its error is relative to each value, not to the token's largest one, so
  the massive dimensions of large models' residual streams do not flush the others to zero.

This module turns tensor memory into frames and frames back into a caller's tensor; what the
file header says about them (dtype, shape, chunk table) is the megabatch format's business.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import zstandard

from activault.errors import ConfigError, FormatError
from activault.vault.codec_pool import Threads as Threads
from activault.vault.codec_pool import map_range

Compression = Literal["none", "zstd", "fp8"]
CODEC_VERSION = 1
# 4 MiB of raw states per chunk: ratio within 0.1% of 16 MiB chunks and a dozen chunks per
# 64 MiB file to spread over threads (bench/compression.py).
CHUNK_BYTES = 4 << 20
# zstd level 1: the best ratio on byte planes of activations (levels 2-3 are slower and worse:
# their match finders spend bits on short matches in near-random bytes; negative levels skip
# the entropy coder, which is where the savings come from).
LEVEL = 1
E4M3_MAX = 448.0  # largest finite float8 e4m3fn
# Bound on fp8's relative L2 error per finite token: e4m3 rounds to 3 mantissa bits (at most 2^-4
# relative per value), plus bf16's rounding of the decoded value (2^-9) and subnormals' share.
FP8_MAX_TOKEN_ERROR = 0.07
# The most bytes a zstd frame can decode to, per stored byte: every block takes at least 4 bytes
# (an RLE block: 3 of header, 1 repeated) and yields at most 128 KiB (RFC 8878 3.1.1.2), so a
# header declaring more than this of a chunk describes bytes that cannot be there.
MAX_RATIO = (128 << 10) // 4
# Bounds on the numbers of a codec description, checked before any arithmetic on them.
MAX_DIMS = 8
MAX_DIM = 1 << 48


@dataclass(frozen=True)
class Codec:
    """How states are stored: `zstd` (lossless) or `fp8` (lossy), the zstd level, raw bytes per chunk."""

    name: Literal["zstd", "fp8"]
    level: int = LEVEL
    chunk_bytes: int = CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.name not in ("zstd", "fp8"):
            raise ConfigError(f"unknown codec {self.name!r}; use none, zstd or fp8")
        if self.chunk_bytes < 1:
            raise ConfigError(f"chunk size must be at least 1 byte, got {self.chunk_bytes}")

    def chunk_tokens(self, width: int, itemsize: int) -> int:
        """Tokens (rows of `width` elements) per chunk."""
        return max(1, self.chunk_bytes // max(1, width * itemsize))

    @property
    def lossless(self) -> bool:
        return self.name == "zstd"


def from_config(compression: Compression, level: int = LEVEL, chunk_bytes: int = CHUNK_BYTES) -> Codec | None:
    """The codec a config names; None for `none`."""
    return None if compression == "none" else Codec(compression, level, chunk_bytes)


def description_problem(described: Any) -> str | None:
    """What is wrong with a codec's description as metadata.json records it (`describe`), or None."""
    if not isinstance(described, dict) or described.get("codec") not in ("none", "zstd", "fp8"):
        return f"'compression' is {str(described)[:80]}, not a codec's description"
    level, chunk = described.get("level", LEVEL), described.get("chunk_bytes", CHUNK_BYTES)
    if described["codec"] != "none" and not (_int(level, -(1 << 17), 23) and _int(chunk, 1, 1 << 30)):
        return f"'compression' has level {level!r} and chunk_bytes {chunk!r}, not a zstd level and a chunk size"
    return None


def from_description(described: dict[str, Any]) -> Codec | None:
    """The codec a metadata.json records for new files (checked by its schema: `description_problem`)."""
    if described["codec"] == "none":
        return None
    return Codec(described["codec"], described.get("level", LEVEL), described.get("chunk_bytes", CHUNK_BYTES))


def name(codec: Codec | None) -> str:
    """The codec as a config names it: none, zstd or fp8 (with its level where not the default)."""
    if codec is None:
        return "none"
    return codec.name if codec.level == LEVEL or codec.name == "fp8" else f"{codec.name} level {codec.level}"


def describe(codec: Codec | None) -> dict[str, Any]:
    """The codec as metadata.json records it; each file's header says how that file is stored."""
    if codec is None:
        return {"codec": "none"}
    return {"codec": codec.name, "level": codec.level, "chunk_bytes": codec.chunk_bytes, "lossless": codec.lossless}


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(tokens, width) of `t: [..., width]`; a 0-d tensor is one token of one element."""
    width = t.shape[-1] if t.dim() else 1
    return math.prod(t.shape[:-1]) if t.dim() else 1, width


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


UINTS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


class _Scratch(threading.local):
    """One reusable buffer per thread: a fresh 4 MiB per chunk costs as much in page faults as zstd."""

    buf: np.ndarray | None = None

    def get(self, n: int) -> np.ndarray:
        if self.buf is None or self.buf.size < n:
            if n > KEEP_SCRATCH:
                return np.empty(n, np.uint8)  # an unusual chunk size: not held by the thread afterwards
            self.buf = np.empty(n, np.uint8)
        return self.buf[:n]


# Payloads up to this stay allocated on each thread that decoded one (the pool's: one per core).
KEEP_SCRATCH = 16 << 20
# Decoding's scratch, kept across calls: the pool's threads outlive them.
_decode_scratch = _Scratch()


def _split(raw: np.ndarray, k: int, scratch: _Scratch) -> np.ndarray:
    """Bytes of `n` elements of `k` bytes regrouped into `k` planes: `[k * n]`, plane p = byte p of each."""
    if k == 1:
        return raw
    n = raw.size // k
    x, planes = raw.view(UINTS[k]), scratch.get(raw.size)
    # Shift and truncate: vectorised, ~4x faster than byte-strided copies.
    for p in range(k):
        np.right_shift(x, 8 * p, out=planes[p * n : (p + 1) * n], casting="unsafe")
    return planes


def _merge(planes: np.ndarray, k: int, out: np.ndarray) -> None:
    """Inverse of `_split`, into `out` (`[k * n]` uint8), with no intermediate array."""
    if k == 1:
        np.copyto(out, planes)
        return
    n = out.size // k
    if k == 2:
        # bf16/fp16: the high plane shifted in as whole uint16 writes, then the low plane OR-ed in
        # (numpy casts in cache-sized blocks): 7 GB/s here, 2x the byte-strided writes below.
        x = out.view(UINTS[2])
        np.left_shift(planes[n:], 8, out=x, dtype=UINTS[2])
        np.bitwise_or(x, planes[:n], out=x, casting="unsafe")
        return
    # Wider items: each plane written straight into its byte column (1.4-1.8x the shift-and-or of
    # 4 planes through a temporary; docs/benchmarks.md, "Decode at the limit").
    cols = out.reshape(n, k)
    for p in range(k):
        cols[:, p] = planes[p * n : (p + 1) * n]


def _fp8_payload(x: torch.Tensor, scratch: _Scratch) -> np.ndarray:
    """`x: [n, d]` as fp8 bytes: planes of the n float32 scales, then the n*d e4m3 values."""
    x = x.float()
    if x.shape[1] == 0:
        scale = torch.zeros(x.shape[0])
    else:
        scale = torch.where(x.isfinite(), x.abs(), 0).amax(1) / E4M3_MAX  # [n]
    safe = torch.where(scale > 0, scale, 1).unsqueeze(1)
    # e4m3fn has no Inf: an Inf is stored as NaN, never clamped to 448 (a finite value: a token of
    # Infs decoded as zeros, a lone -Inf as minus the token's largest magnitude, each with a finite
    # norm that the NaN/Inf filter and counts then missed). The clamp: a finite x / scale can round
    # just above 448, which e4m3fn would turn into NaN.
    q = (x / safe).masked_fill_(x.isinf(), math.nan).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    n = x.shape[0]
    payload = scratch.get(n * (4 + x.shape[1]))
    payload[: 4 * n] = _split(_bytes(scale), 4, _Scratch())
    payload[4 * n :] = _bytes(q)
    return payload


def token_errors(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per token `|y - x| / |x|` of `[..., d]` tensors (0 for zero tokens), float64."""
    x64, y64 = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
    norm = torch.linalg.vector_norm(x64, dim=1)
    err = torch.linalg.vector_norm(y64 - x64, dim=1)
    return torch.where(norm > 0, err / norm.clamp_min(1e-300), err)


def _compress_chunk(x: torch.Tensor, codec: Codec, scratch: _Scratch) -> bytes:
    payload = _fp8_payload(x, scratch) if codec.name == "fp8" else _split(_bytes(x), x.element_size(), scratch)
    # A checksum per frame: a flipped bit is an error naming the chunk, never wrong numbers.
    return zstandard.ZstdCompressor(level=codec.level, write_checksum=True).compress(payload.data)


def compress(t: torch.Tensor, codec: Codec, threads: Threads = None) -> tuple[list[bytes], int]:
    """`t: [..., d]` (contiguous, CPU) as zstd frames, one per chunk of whole tokens; and tokens per chunk."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor must be contiguous and on the CPU")
    if codec.name == "fp8" and not t.is_floating_point():
        raise ValueError(f"fp8 stores floating-point tensors, not {t.dtype}")
    tokens, width = _rows(t)
    flat = t.reshape(tokens, width)  # [tokens, d]
    per = codec.chunk_tokens(width, t.element_size())
    scratch = _Scratch()
    frames = map_range(
        lambda i: _compress_chunk(flat[i * per : (i + 1) * per], codec, scratch), -(-tokens // per), threads
    )
    return frames, per  # type: ignore[return-value]


def payload_size(codec: str, tokens: int, width: int, itemsize: int) -> int:
    """Decompressed bytes of a chunk of `tokens` tokens."""
    return tokens * (4 + width) if codec == "fp8" else tokens * width * itemsize


def _decode_chunk(
    frame: memoryview, i: int, at: int, rows: torch.Tensor, codec: str, scratch: _Scratch, where: str
) -> None:
    """Frame `i` (at byte `at` of the tensor's blob) decoded into `rows: [n, d]`, checked for size."""
    n, width = rows.shape
    k = rows.element_size()
    want = payload_size(codec, n, width, k)
    payload = scratch.get(want)
    end = at + frame.nbytes
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame) as r:
            got = r.readinto(payload)
            extra = r.read(1)  # also reads the frame's end, where its checksum is checked
    except zstandard.ZstdError as e:
        raise FormatError(
            f"{where}: chunk {i} (bytes {at}..{end}) is corrupted ({e}); restore the file or collect it again"
        ) from None
    if got != want or extra:
        raise FormatError(
            f"{where}: chunk {i} decodes to the wrong size ({got}{'+' if extra else ''} bytes, "
            f"expected {want}); restore the file or collect it again"
        )
    if codec == "fp8":
        scale = np.empty(n, np.float32)
        _merge(payload[: 4 * n], 4, scale.view(np.uint8))
        q = torch.from_numpy(payload[4 * n :]).view(torch.float8_e4m3fn).view(n, width)
        rows.copy_(q.float().mul_(torch.from_numpy(scale).unsqueeze(1)))
    else:
        _merge(payload, k, _bytes(rows))


def decompress_into(
    blob: bytes | bytearray | memoryview,
    sizes: Sequence[int],
    chunk_tokens: int,
    codec: str,
    out: torch.Tensor,
    where: str,
    threads: Threads = None,
) -> torch.Tensor:
    """Decode the frames in `blob` (their `sizes` in order) into `out: [..., d]`, the original dtype and shape.

    Each chunk is decoded straight into its rows of `out` (through one reused per-thread scratch
    of the frame's payload), on `threads`: by default the process-wide `codec_pool.decode_pool()`.

    Args:
        where: names the file and tensor in errors, e.g. "s3://b/run/hook/m00000-000003.safetensors 'states'".
    """
    tokens, width = _rows(out)
    flat = out.reshape(tokens, width)
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    mv = memoryview(blob).cast("B")

    def chunk(i: int) -> None:
        rows = flat[i * chunk_tokens : (i + 1) * chunk_tokens]
        _decode_chunk(mv[starts[i] : starts[i + 1]], i, starts[i], rows, codec, _decode_scratch, where)

    map_range(chunk, len(sizes), threads)
    return out


def decode_chunk(frame: bytes | bytearray | memoryview, packed: Packed, i: int, out: torch.Tensor, where: str) -> None:
    """Decode chunk `i` alone, from its frame's bytes (`packed.spans()[i]` of the blob), into its rows of `out`.

    For a reader that decodes chunks as their ranges arrive, e.g. by submitting this to
    `codec_pool.decode_pool()`; `out` is the whole decoded tensor (`packed.dtype`, `packed.shape`).
    """
    if out.dtype != packed.dtype or list(out.shape) != list(packed.shape) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {packed.dtype} tensor of shape {packed.shape}")
    if not 0 <= i < len(packed.chunks):
        raise IndexError(f"chunk {i} of {len(packed.chunks)}")
    mv = memoryview(frame).cast("B")
    at, end = packed.spans()[i]
    if mv.nbytes != end - at:
        raise ValueError(f"chunk {i} is {end - at} bytes, got {mv.nbytes}")
    tokens, width = _rows(out)
    rows = out.reshape(tokens, width)[i * packed.chunk_tokens : (i + 1) * packed.chunk_tokens]
    _decode_chunk(mv, i, at, rows, packed.codec, _decode_scratch, where)


def decode_limit(
    blob: bytes | bytearray | memoryview, packed: Packed, threads: Threads = None, rounds: int = 1
) -> float:
    """The machine's decode limit: decoded bytes/s of these chunks on `threads` (all cores), no I/O.

    The output is allocated and first touched by one untimed decode, as a reader's reused buffer
    is; the figure is the fastest of `rounds` decodes.
    """
    out = torch.empty(packed.shape, dtype=packed.dtype)
    decompress_into(blob, packed.chunks, packed.chunk_tokens, packed.codec, out, "decode_limit", threads)
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        decompress_into(blob, packed.chunks, packed.chunk_tokens, packed.codec, out, "decode_limit", threads)
        best = min(best, time.perf_counter() - t0)
    return out.numel() * out.element_size() / best


@dataclass(frozen=True)
class Packed:
    """A compressed tensor as its file's header describes it (see docs/format.md)."""

    codec: str
    dtype: torch.dtype
    shape: list[int]
    level: int
    chunk_tokens: int
    chunks: list[int]  # compressed bytes of each chunk, in order
    version: int = CODEC_VERSION

    def entry(self, dtype_code: str) -> dict[str, Any]:
        """The JSON the header stores for this tensor."""
        return {
            "codec": self.codec,
            "version": self.version,
            "dtype": dtype_code,
            "shape": self.shape,
            "level": self.level,
            "chunk_tokens": self.chunk_tokens,
            "chunks": self.chunks,
        }

    def spans(self) -> list[tuple[int, int]]:
        """Each chunk's frame as bytes [start, end) of the stored blob."""
        ends = np.cumsum(self.chunks, dtype=np.int64).tolist()
        return list(zip([0, *ends][:-1], ends, strict=True))

    def matches(self, codec: Codec) -> bool:
        """Whether this tensor is already stored as `codec` would store it (same bytes)."""
        itemsize = self.dtype.itemsize
        width = self.shape[-1] if self.shape else 1
        return (self.codec, self.level, self.chunk_tokens) == (
            codec.name,
            codec.level,
            codec.chunk_tokens(width, itemsize),
        )


def pack(t: torch.Tensor, codec: Codec, threads: Threads = None) -> tuple[Packed, list[bytes]]:
    """Compress `t` and describe it for the header."""
    frames, per = compress(t, codec, threads)
    return Packed(codec.name, t.dtype, list(t.shape), codec.level, per, [len(f) for f in frames]), frames


def _int(x: Any, low: int = 0, high: int = MAX_DIM) -> bool:
    return type(x) is int and low <= x < high


def parse(raw: Any, stored_bytes: int, dtypes: Mapping[str, torch.dtype], where: str) -> Packed:
    """Validate a header's description of a compressed tensor stored in `stored_bytes` bytes.

    Every number is checked for type and bounds, and each chunk may not decode to more than zstd
    can produce from its bytes (`MAX_RATIO`), so a hostile description is refused before anything
    is allocated for it.
    """
    bad = f"{where}: corrupted codec description in the header"
    if not isinstance(raw, dict):
        raise FormatError(f"{bad} (not an object)")
    fields: list[Any] = [raw.get(k) for k in ("codec", "version", "dtype", "shape", "level", "chunk_tokens", "chunks")]
    codec, version, code, shape, level, per, chunks = fields
    if not isinstance(codec, str) or not _int(version, 1, 1 << 31):
        raise FormatError(f"{bad} (codec must be a name, version a positive integer)")
    if codec not in ("zstd", "fp8") or version > CODEC_VERSION:
        raise FormatError(
            f"{where}: stored with codec {codec[:20]!r} version {version}, which this activault cannot "
            "decode; upgrade activault"
        )
    if not isinstance(code, str) or code not in dtypes:
        raise FormatError(f"{bad} (unknown dtype {str(code)[:20]!r})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(s) for s in shape):
        raise FormatError(f"{bad} (shape must be at most {MAX_DIMS} non-negative integers below 2^48)")
    if not _int(level, -(1 << 31), 1 << 31) or not _int(per, 1):
        raise FormatError(f"{bad} (level and chunk_tokens must be integers, chunk_tokens at least 1)")
    if not isinstance(chunks, list) or not all(_int(c, 0, 1 << 62) for c in chunks):
        raise FormatError(f"{bad} (chunks must be a list of non-negative integers)")
    dtype = dtypes[code]
    if codec == "fp8" and not dtype.is_floating_point:
        raise FormatError(f"{where}: fp8 codec for a {dtype} tensor (corrupted header)")
    tokens = math.prod(shape[:-1]) if shape else 1
    if len(chunks) != -(-tokens // per):
        raise FormatError(f"{where}: inconsistent shape and chunk table in the header (corrupted header)")
    if sum(chunks) != stored_bytes:
        raise FormatError(
            f"{where}: chunk table covers {sum(chunks)} bytes, the tensor holds {stored_bytes} (corrupted file)"
        )
    width, k = (shape[-1] if shape else 1), dtype.itemsize
    for i, c in enumerate(chunks):
        want = payload_size(codec, min(per, tokens - i * per), width, k)
        if want > c * MAX_RATIO:
            raise FormatError(
                f"{where}: the header says chunk {i} ({c} bytes) decodes to {want} bytes ({code} {shape}), "
                f"more than zstd can produce from it ({MAX_RATIO} per byte): corrupted or edited header; "
                "restore the file or collect it again"
            )
    return Packed(codec, dtype, shape, level, per, chunks, version)


def check_frames(blob: bytes | bytearray | memoryview, packed: Packed, where: str) -> None:
    """Each chunk is a zstd frame declaring the size the header's description gives its payload."""
    mv = memoryview(blob).cast("B")
    tokens = math.prod(packed.shape[:-1]) if packed.shape else 1
    width = packed.shape[-1] if packed.shape else 1
    at = 0
    for i, c in enumerate(packed.chunks):
        n = min(packed.chunk_tokens, tokens - i * packed.chunk_tokens)
        want = payload_size(packed.codec, n, width, packed.dtype.itemsize)
        try:
            got = zstandard.frame_content_size(mv[at : at + c])
        except zstandard.ZstdError as e:
            raise FormatError(
                f"{where}: chunk {i} (bytes {at}..{at + c}) is not a zstd frame ({e}); "
                "restore the file or collect it again"
            ) from None
        if got != want:
            raise FormatError(
                f"{where}: chunk {i} holds a frame of {got} bytes, the header describes {want} "
                f"({packed.codec} {list(packed.shape)}): corrupted or edited header; "
                "restore the file or collect it again"
            )
        at += c


def unpack(
    blob: bytes | bytearray | memoryview,
    packed: Packed,
    where: str,
    empty: Callable[..., torch.Tensor] = torch.empty,
    threads: Threads = None,
) -> torch.Tensor:
    """The tensor, decoded into a new buffer from `empty(shape, dtype=...)` (e.g. pinned memory).

    Each frame's declared content size is checked against the header first, so a description
    that does not fit the frames costs no allocation.
    """
    check_frames(blob, packed, where)
    out = empty(packed.shape, dtype=packed.dtype)
    return decompress_into(blob, packed.chunks, packed.chunk_tokens, packed.codec, out, where, threads)
