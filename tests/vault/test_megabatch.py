"""Megabatch format: round trip, safetensors compatibility, zero copy, one validator, checksums."""

from __future__ import annotations

import json
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors import safe_open

from activault.errors import FormatError
from activault.vault import codec as codecs
from activault.vault.megabatch import (
    FORMAT_VERSION,
    PROVENANCE_SINCE,
    check_provenance,
    decode,
    encode,
    padding_values,
    parse_header,
    relabelled,
)
from support.megabatches import (
    NAME,
    blob,
    equal,
    megabatch,
    with_documents,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_format_round_trip_and_safetensors_compatibility(tmp_path, dtype):
    tensors = megabatch(dtype)
    parts = encode(tensors, {"hook": "h", "file_index": "7"})
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"".join(parts))
    mb = decode(path.read_bytes(), "f.safetensors", verify_checksums=True)
    assert {"hook": "h", "file_index": "7"}.items() <= mb.metadata.items()
    assert set(mb.header.checksums) == set(tensors)
    assert equal(mb.tensors, tensors) and mb.positions is mb.tensors["positions"]
    with safe_open(str(path), "pt") as f:  # the reference implementation reads our files
        assert f.metadata() == mb.metadata
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)


def test_encode_does_not_copy_the_states():
    tensors = megabatch(torch.float32)
    parts = encode(tensors, {})
    states_part = next(p for p in parts if p.nbytes == tensors["states"].numel() * 4)
    tensors["states"][0, 0, 0] = 42.0  # the buffer handed to the writer is the tensor's own memory
    assert np.frombuffer(states_part, dtype=np.float32)[0] == 42.0


@pytest.mark.parametrize("version", [None, str(FORMAT_VERSION)])
def test_padding_is_stored_as_zeros_whatever_the_states_hold_there(version: str | None) -> None:
    """Position -1 is padding, whose states the format stores as +0.0 (and whose norm is 0): a
    caller's values there (an imported cache's, -0.0, NaN) become zeros in a copy; the caller's
    tensor is untouched, and padding already zero is written from the caller's memory."""
    tensors = megabatch(torch.bfloat16, d=8)
    tensors["documents"] = torch.arange(3).repeat_interleave(5).view(3, 5)
    tensors["positions"][2, 3:] = tensors["documents"][2, 3:] = -1
    tensors["states"][2, 3, :4] = torch.tensor([-0.0, float("nan"), 1.0, 2.0])
    before = tensors["states"].clone()
    assert padding_values(tensors["states"], tensors["positions"]) == 2
    meta = {} if version is None else {"format_version": version}
    mb = decode(b"".join(encode(tensors, meta)), NAME, verify_checksums=True)
    stored = mb.tensors["states"]
    assert stored[2, 3:].view(torch.int16).eq(0).all() and padding_values(stored, mb.tensors["positions"]) == 0
    assert torch.equal(stored[:2], before[:2]) and torch.equal(stored[2, :3], before[2, :3])
    assert torch.equal(tensors["states"].view(torch.int16), before.view(torch.int16))  # not written into
    if mb.norms is not None:
        assert mb.norms[2, 3:].eq(0).all() and mb.norms[2, :3].gt(0).all()
    tensors["states"][2, 3:] = 0
    parts = encode(tensors, {})
    states_part = next(p for p in parts if p.nbytes == tensors["states"].numel() * 2)
    tensors["states"][0, 0, 0] = 42.0  # zero padding: the caller's own memory, no copy
    assert torch.frombuffer(bytearray(states_part), dtype=torch.bfloat16)[0] == 42.0


def inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.numel()


def test_decoded_tensors_are_views_of_the_buffer_given_whether_bytes_or_a_tensor():
    tensors = megabatch(torch.float32)
    data = bytearray(blob(tensors))
    buf = torch.frombuffer(data, dtype=torch.uint8)
    for passed in (data, memoryview(data), buf):
        mb = decode(passed, NAME, verify_checksums=True)
        assert equal(mb.tensors, tensors) and all(inside(t, buf) for t in mb.tensors.values())
    # Read-only bytes (an object store's answer) decode without torch's warning about them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert equal(decode(bytes(data), NAME).tensors, tensors)


def test_compressed_tensors_are_decoded_into_the_callers_buffers():
    tensors = megabatch(torch.bfloat16, rows=4, seq=8, d=16)
    parts = encode(tensors, {}, compression=codecs.Codec("zstd", chunk_bytes=256))
    buf = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    taken: list[torch.Tensor] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        taken.append(torch.full(shape, 7, dtype=dtype))  # a recycled buffer: old contents
        return taken[-1]

    mb = decode(buf, NAME, verify_checksums=True, alloc=alloc)
    assert equal(mb.tensors, tensors)
    assert [(tuple(t.shape), t.dtype) for t in taken] == [((4, 8, 16), torch.bfloat16)]
    assert mb.states.data_ptr() == taken[0].data_ptr()  # decoded in place, not copied after
    assert inside(mb.input_ids, buf) and inside(mb.positions, buf)  # raw ones: still views


def test_compressed_chunks_decode_on_the_callers_executor():
    tensors = megabatch(torch.bfloat16, rows=4, seq=8, d=16)
    parts = encode(tensors, {}, compression=codecs.Codec("zstd", chunk_bytes=256))
    submitted: list[object] = []

    class Spy(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    with Spy(2) as pool:
        mb = decode(b"".join(parts), NAME, verify_checksums=True, threads=pool)
    assert equal(mb.tensors, tensors)
    assert len(submitted) == len(parse_header(b"".join(parts), NAME).packed["states"].chunks) == 4


def test_a_foreign_file_with_an_unaligned_tensor_reads_by_one_copy():
    # safetensors allows any offsets: three bytes before `states` put it off its 4-byte alignment.
    want = megabatch(torch.float32, rows=1, seq=2, d=2)
    body = [("odd", "U8", [3], b"abc")] + [
        (n, {torch.float32: "F32", torch.int32: "I32"}[t.dtype], list(t.shape), t.numpy().tobytes())
        for n, t in want.items()
    ]
    raw, at = {}, 0
    for name, code, shape, data in body:
        raw[name] = {"dtype": code, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    head = json.dumps(raw).encode()
    head += b" " * (-len(head) % 8)
    got = decode(struct.pack("<Q", len(head)) + head + b"".join(d for *_, d in body), NAME).tensors
    assert equal({k: v for k, v in got.items() if k != "odd"}, want) and bytes(got["odd"].numpy()) == b"abc"


def test_documents_round_trip_and_files_without_them_still_read():
    mb = decode(blob(with_documents()), NAME, verify_checksums=True)
    assert mb.header.version == FORMAT_VERSION >= PROVENANCE_SINCE
    assert torch.equal(mb.documents, with_documents()["documents"])
    old = decode(blob(), NAME, verify_checksums=True)  # format version 3: no documents
    assert old.header.version == 3 and old.documents is None and equal(old.tensors, megabatch())


def test_relabelling_keeps_files_without_documents_below_version_4():
    assert relabelled({"format_version": "2"})["format_version"] == "3"
    assert relabelled({"format_version": "4"})["format_version"] == str(FORMAT_VERSION)


def prov(docs: list[list[int]], pos: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(docs, dtype=torch.int64), torch.tensor(pos, dtype=torch.int32)


def test_provenance_in_collection_order_passes_and_carries_to_the_next_file():
    # document 7 split across rows (and cleaning skipped its position 3), then 8, then padding
    docs, pos = prov([[7, 7, 7], [7, 8, 8], [8, -1, -1]], [[0, 1, 2], [4, 1, 2], [3, -1, -1]])
    assert check_provenance(docs, pos, NAME, after=(6, 40)) == (8, 3)
    assert check_provenance(*prov([[-1, -1]], [[-1, -1]]), NAME, after=(8, 3)) == (8, 3)


@pytest.mark.parametrize(
    "docs,pos,after,message",
    [
        ([[3, 2]], [[0, 0]], None, "out of order at row 0, column 1: document 2 position 0 follows document 3"),
        ([[3, 3]], [[1, 1]], None, "out of order at row 0, column 1"),
        ([[3, 4], [3, 3]], [[0, 0], [1, 2]], None, "out of order at row 1, column 0"),  # not contiguous
        ([[3, 3]], [[0, 1]], (4, 0), "out of order at row 0, column 0: document 3 position 0 follows document 4"),
        ([[3, -1]], [[0, 5]], None, "row 0, column 1 is document -1, position 5: padding is -1 in both"),
        ([[-1, 3]], [[-1, 0]], None, "padding at row 0, column 0 before real tokens"),
        ([[-5, 3]], [[-1, 0]], None, "document -5"),
    ],
)
def test_provenance_out_of_order_or_with_odd_padding_is_refused(docs, pos, after, message):
    with pytest.raises(FormatError, match=f"{NAME}: .*{message}"):
        check_provenance(*prov(docs, pos), NAME, after=after)


def test_a_buffer_at_an_odd_offset_of_its_memory_decodes_by_copies_not_an_error():
    want = with_documents()
    b = blob(want)
    memory = torch.zeros(len(b) + 1, dtype=torch.uint8)
    buf = memory[1:]  # e.g. a reader's buffer carved from a larger one at an odd offset
    buf.copy_(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    got = decode(buf, NAME).tensors
    assert equal({k: v for k, v in got.items() if k != "norms"}, want)
    memory = torch.zeros(len(b) + 8, dtype=torch.uint8)
    buf = memory[8:]
    buf.copy_(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    got = decode(buf, NAME).tensors
    assert all(inside(t, memory) for t in got.values()), "at an aligned offset: views of the memory, no copy"
