"""The megabatch file format: safetensors, written from tensor memory without copies.

A file is `u64 header length | JSON header | raw tensor bytes`, the safetensors layout, so
`safetensors.safe_open` reads our files and we read theirs. The header's `__metadata__` says
what the file is (format, version, run, hook, machine, file index). Nothing is ever unpickled:
legacy `.pt` files of the original project load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from activault.errors import FormatError
from activault.vault import codec as codecs

if TYPE_CHECKING:
    from activault.storage.base import Entry, Store

FORMAT = "activault"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
# Headers above this are not ours (the three tensors' header is a few hundred bytes).
MAX_HEADER = 1 << 24
# Header metadata key: JSON {tensor: codec description} of the compressed tensors (docs/format.md).
CODECS_KEY = "codecs"
# Tensors a codec applies to; ids and positions stay raw (verify reads them by range; 1% of bytes).
COMPRESSIBLE = ("states",)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


def file_name(machine: int, index: int) -> str:
    """Megabatch file name; the same in every hook folder for the same tokens."""
    return f"m{machine:05d}-{index:06d}{SUFFIX}"


def parse_file_name(name: str) -> tuple[int, int] | None:
    """(machine, index) of one of our file names, else None."""
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith("m") and base.endswith(SUFFIX)):
        return None
    stem = base[1 : -len(SUFFIX)]
    machine, _, index = stem.partition("-")
    if not (machine.isdigit() and index.isdigit()):
        return None
    return int(machine), int(index)


def is_megabatch(name: str) -> bool:
    """Whether a key names a megabatch file (ours, or the original's `.pt`)."""
    return name.endswith(SUFFIX) or name.endswith(LEGACY_SUFFIX)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor must be contiguous and on the CPU")
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def encode(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], compression: codecs.Codec | None = None
) -> list[memoryview]:
    """The file as buffers: the header, then each tensor's memory (no copy of the data).

    With `compression`, `states` is stored as a uint8 tensor of zstd frames and described in the
    header metadata under `codecs` (docs/format.md); the file stays a valid safetensors file.
    """
    meta = {k: str(v) for k, v in metadata.items()}
    # name -> (dtype code, shape, buffers, item size)
    stored: dict[str, tuple[str, list[int], list[memoryview], int]] = {}
    packed: dict[str, Any] = {}
    for name, t in tensors.items():
        if compression is not None and name in COMPRESSIBLE:
            p, frames = codecs.pack(t, compression)
            packed[name] = p.entry(CODES[t.dtype])
            stored[name] = ("U8", [sum(p.chunks)], [memoryview(f) for f in frames], 1)
        else:
            stored[name] = (CODES[t.dtype], list(t.shape), [tensor_bytes(t)], t.element_size())
    if packed:
        meta[CODECS_KEY] = json.dumps(packed, separators=(",", ":"))
    # Widest items first keeps every tensor aligned to its item size after an 8-aligned header.
    names = sorted(stored, key=lambda n: -stored[n][3])
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name in names:
        code, shape, bufs, _ = stored[name]
        nbytes = sum(b.nbytes for b in bufs)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [memoryview(struct.pack("<Q", len(raw)) + raw)] + [b for n in names for b in stored[n][2]]


def read_header(buf: bytes | bytearray | memoryview, name: str) -> tuple[dict[str, Any], int]:
    """The parsed header and the offset where tensor data starts; validates sizes."""
    mv = memoryview(buf)
    if mv.nbytes < 8:
        raise FormatError(f"{name}: truncated file ({mv.nbytes} bytes); delete it and collect again")
    (n,) = struct.unpack_from("<Q", mv, 0)
    if n > MAX_HEADER or 8 + n > mv.nbytes:
        raise FormatError(
            f"{name}: corrupted or truncated header (declares {n} bytes, file has {mv.nbytes}); "
            "delete it and collect again"
        )
    try:
        header = json.loads(bytes(mv[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{name}: corrupted header ({e}); delete it and collect again") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name}: corrupted header (not a JSON object)")
    return header, 8 + n


def header_length(first8: bytes, name: str) -> int:
    """Total bytes of length prefix and header, from the file's first 8 bytes."""
    if len(first8) < 8:
        raise FormatError(f"{name}: truncated file ({len(first8)} bytes)")
    (n,) = struct.unpack_from("<Q", first8, 0)
    if n > MAX_HEADER:
        raise FormatError(f"{name}: corrupted header length {n}")
    return 8 + n


def fetch_header(store: Store, key: str, size: int | None = None) -> tuple[dict[str, Any], int]:
    """A stored file's header and data offset from two ranged reads (no tensor bytes fetched)."""
    name = store.url(key)
    first = bytes(store.get_range(key, 0, 8 if size is None else min(size, 8)))
    n = header_length(first, name)
    return read_header(store.get_range(key, 0, n if size is None else min(size, n)), name)


def megabatch_files(entries: Iterable[Entry]) -> dict[str, int]:
    """Megabatch file name -> size, from a folder's listing (in listing order)."""
    return {e.key.rsplit("/", 1)[-1]: e.size for e in entries if is_megabatch(e.key)}


def tensor_specs(header: Mapping[str, Any], data_len: int, name: str) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Validate the header's tensors against the data length: name -> (dtype, shape, start, end)."""
    specs: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{name}: corrupted header entry for {key!r}") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or end - start != expected or start < 0:
            raise FormatError(f"{name}: tensor {key!r} has inconsistent shape and offsets")
        if end > data_len:
            raise FormatError(
                f"{name}: truncated file (tensor {key!r} needs {end} data bytes, file has {data_len}); "
                "delete it and collect again"
            )
        specs[key] = (dtype, shape, start, end)
    end = max((s[3] for s in specs.values()), default=0)
    if end != data_len:
        raise FormatError(f"{name}: {data_len - end} unexpected bytes after the tensors (corrupted file)")
    return specs


def decode(
    buf: bytes | bytearray | memoryview, name: str, empty: Callable[..., torch.Tensor] = torch.empty
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (views of `buf`, no copy) and header metadata of one megabatch file.

    Compressed tensors are decoded into new buffers from `empty(shape, dtype=...)`.
    """
    if name.endswith(LEGACY_SUFFIX):
        return decode_legacy(buf, name), {}
    header, start = read_header(buf, name)
    mv = memoryview(buf)[start:]
    specs = tensor_specs(header, mv.nbytes, name)
    out = {}
    with warnings.catch_warnings():
        # Object-store buffers are read-only; tensors over them are only ever read.
        warnings.simplefilter("ignore", UserWarning)
        for key, (dtype, shape, s, e) in specs.items():
            if e == s:
                out[key] = torch.empty(shape, dtype=dtype)
            else:
                out[key] = torch.frombuffer(mv[s:e], dtype=dtype).view(shape)
    for key, p in packed_specs(header, name).items():
        out[key] = codecs.unpack(mv[specs[key][2] : specs[key][3]], p, f"{name} {key!r}", empty)
    meta = header.get("__metadata__") or {}
    return out, dict(meta)


def packed_specs(header: Mapping[str, Any], name: str) -> dict[str, codecs.Packed]:
    """The compressed tensors a header describes, checked against their stored sizes."""
    raw = (header.get("__metadata__") or {}).get(CODECS_KEY)
    if raw is None:
        return {}
    try:
        described = json.loads(raw)
        stored = {k: header[k] for k in described}
        sizes = {k: int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for k, v in stored.items() if v["dtype"] == "U8"}
    except (TypeError, KeyError, ValueError, json.JSONDecodeError):
        raise FormatError(f"{name}: corrupted codec description in the header") from None
    if len(sizes) != len(described):
        raise FormatError(f"{name}: the header's codecs name tensors not stored as uint8 (corrupted header)")
    return {k: codecs.parse(v, sizes[k], DTYPES, f"{name} {k!r}") for k, v in described.items()}


def logical_specs(header: Mapping[str, Any], name: str) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Each tensor's dtype and shape once decoded (a compressed tensor's original ones), from the header."""
    out = {}
    for key, info in header.items():
        if key != "__metadata__":
            try:
                out[key] = (DTYPES[info["dtype"]], [int(s) for s in info["shape"]])
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{name}: corrupted header entry for {key!r}") from None
    out.update({k: (p.dtype, p.shape) for k, p in packed_specs(header, name).items()})
    return out


def decode_legacy(buf: bytes | bytearray | memoryview, name: str) -> dict[str, torch.Tensor]:
    """A megabatch of the original project (`torch.save`d dict), loaded without running pickled code."""
    try:
        obj = torch.load(io.BytesIO(bytes(buf)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise FormatError(f"{name}: not a loadable tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "states" not in obj:
        raise FormatError(f"{name}: legacy file has no 'states' tensor")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def hook_metadata(
    *,
    run_name: str,
    hook: str,
    d_model: int,
    dtype: torch.dtype,
    seq_length: int,
    rows_per_file: int,
    batch_size: int,
    batches_per_upload: int,
    model: str,
    compression: codecs.Codec | None = None,
) -> dict[str, Any]:
    """Contents of `{run}/{hook}/metadata.json`; `compression` is how new files are written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_file = rows_per_file * seq_length * (d_model * itemsize + 8)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run_name": run_name,
        "hook": hook,
        "model": model,
        "shape": [rows_per_file, seq_length, d_model],
        "dtype": dtype_name(dtype),
        "d_model": d_model,
        "seq_length": seq_length,
        "batch_size": batch_size,
        "batches_per_upload": batches_per_upload,
        "rows_per_file": rows_per_file,
        "bytes_per_file": per_file,
        "tensors": {
            "states": {"dtype": dtype_name(dtype), "shape": ["rows", seq_length, d_model]},
            "input_ids": {"dtype": "int32", "shape": ["rows", seq_length]},
            "positions": {"dtype": "int32", "shape": ["rows", seq_length]},
        },
        "file_pattern": "m{machine:05d}-{index:06d}.safetensors",
        "compression": codecs.describe(compression),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
