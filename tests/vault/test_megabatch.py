"""Megabatch format: round trip, safetensors compatibility, zero copy, one validator, checksums."""

from __future__ import annotations

import json
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from activault.errors import FormatError
from activault.storage import LocalStore
from activault.vault import codec as codecs
from activault.vault.megabatch import (
    FORMAT_VERSION,
    HEAD_READ,
    PROVENANCE_SINCE,
    Header,
    check_checksums,
    check_provenance,
    decode,
    encode,
    fetch_header,
    parse_header,
    relabelled,
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
    with pytest.raises(FormatError, match=f"{NAME}: .*{message}"):
        decode(damage(blob()), NAME)


def edit(entry: str, **change):
    """A file (header, body) with some fields of one header entry changed."""

    def apply() -> tuple[dict, bytes]:
        raw, body = split(blob(meta={}, checksums=False))
        raw[entry] = {**raw[entry], **change}
        return raw, body

    return apply


def drop(entry: str):
    """A file (header, body) written without `entry`."""

    def apply() -> tuple[dict, bytes]:
        tensors = megabatch()
        del tensors[entry]
        return split(blob(tensors, meta={}, checksums=False))

    return apply


@pytest.mark.parametrize(
    "change,message",
    [
        (drop("positions"), "no 'positions' tensor"),
        (drop("states"), "no 'states' tensor"),
        (edit("positions", dtype="I64", shape=[3, 5 // 2]), "does not fill bytes"),
        (edit("positions", dtype="F32"), "'positions' is [3, 5] float32, expected [3, 5] int32"),
        (edit("input_ids", shape=[5, 3]), "'input_ids' is [5, 3] int32, expected [3, 5] int32"),
        (edit("states", shape=[3, 20]), "'states' is [3, 20] bfloat16, expected [rows, seq, d]"),
        (edit("states", shape=[3, 5, 4.0]), "shape must be at most 8 non-negative integers"),
        (edit("states", shape=[3, True, 20]), "shape must be at most 8 non-negative integers"),
        (edit("states", dtype="Q8"), "unknown dtype"),
        (edit("states", data_offsets=[0]), "data_offsets must be two"),
        (edit("positions", data_offsets=[0, 60]), "overlaps the tensor before it"),
        (edit("states", extra=1), "needs exactly dtype, shape, data_offsets"),
    ],
)
def test_the_validator_names_each_inconsistency(change, message):
    raw, body = change()  # no checksums: each case reaches the check it is about
    with pytest.raises(FormatError, match=f"{NAME}: .*{message.replace('[', '.').replace(']', '.')}"):
        parse_header(with_header(raw, body), NAME)


def test_tensors_must_cover_the_data_exactly_without_gaps():
    raw, body = split(blob(meta={}, checksums=False))
    s, e = raw["positions"]["data_offsets"]
    raw["positions"]["data_offsets"] = [
        s + 4,
        e + 4,
    ]  # a 4-byte gap before positions, data 4 longer
    with pytest.raises(FormatError, match="leaves a gap"):
        parse_header(with_header(raw, body + b"\0" * 4), NAME)


def test_zero_row_files_are_an_error_not_a_crash():
    empty = megabatch(rows=0)
    with pytest.raises(FormatError, match=f"{NAME}: holds no data"):
        decode(blob(empty), NAME)


def test_duplicate_keys_and_deep_nesting_are_refused():
    raw, body = split(blob(meta={}, checksums=False))
    text = json.dumps(raw)[:-1] + ', "states": ' + json.dumps(raw["states"]) + "}"
    h = text.encode()
    with pytest.raises(FormatError, match="corrupted header"):
        parse_header(struct.pack("<Q", len(h)) + h + body, NAME)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(FormatError, match="corrupted header"):
        parse_header(struct.pack("<Q", len(deep)) + deep, NAME)


def test_a_newer_format_version_asks_for_an_upgrade():
    with pytest.raises(FormatError, match="newer activault .format version 99"):
        decode(blob(meta={"format_version": "99"}), NAME)


# ---- checksums ----


def test_a_flipped_bit_in_any_tensor_is_found_naming_file_and_tensor():
    b = blob()
    header = parse_header(b, NAME)
    assert check_checksums(header, b) is True
    for name in ("states", "input_ids", "positions"):
        start, end = header.byte_range(name)
        for at in (start, (start + end) // 2, end - 1):
            bad = bytearray(b)
            bad[at] ^= 0x10
            with pytest.raises(FormatError, match=f"{NAME}: the bytes of tensor '{name}' do not match"):
                check_checksums(header, bad)
            with pytest.raises(FormatError, match=f"tensor '{name}'"):
                decode(bad, NAME, verify_checksums=True)
            decode(bad, NAME)  # unverified reads do not hash (the header is still valid)


def test_reading_the_same_bytes_as_another_dtype_fails_the_checksum():
    raw, body = split(blob())
    raw["states"]["dtype"] = "F16"  # same size as bf16: the layout stays valid
    with pytest.raises(FormatError, match="tensor 'states' do not match"):
        decode(with_header(raw, body), NAME, verify_checksums=True)


def test_files_without_checksums_still_read():
    v1 = blob(meta={"format": "activault", "format_version": "1"}, checksums=False)
    mb = decode(v1, NAME, verify_checksums=True)
    assert mb.header.checksums == {} and check_checksums(mb.header, v1) is False
    assert equal(mb.tensors, megabatch())


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


@pytest.mark.parametrize(
    "dtype,change",
    [
        (torch.float32, {"dtype": "F64", "shape": [4, 16, 4]}),  # the same bytes as 4 doubles a token
        (torch.float32, {"dtype": "F16", "shape": [4, 16, 16]}),
        (torch.bfloat16, {"dtype": "F16"}),  # the same bits as another 2-byte float
        (torch.float32, {"dtype": "F16"}),  # half the bytes: the frames would say so, but later
        (torch.float32, {"level": 9}),
        (torch.float32, {"chunk_tokens": 16, "chunks": None}),  # the same frames, two by two
    ],
)
def test_an_edited_codec_description_fails_the_checksum_like_a_flipped_bit(dtype, change):
    b = compressed(dtype=dtype)
    if "chunks" in change:
        c = json.loads(split(b)[0]["__metadata__"]["codecs"])["states"]["chunks"]
        change = {**change, "chunks": [x + y for x, y in zip(c[::2], c[1::2], strict=True)]}
    bad = edit_codec(b, **change)
    parse_header(bad, NAME)  # a valid header: only the checksum can tell
    with pytest.raises(FormatError, match=f"{NAME}: the bytes of tensor 'states' do not match their checksum"):
        decode(bad, NAME, verify_checksums=True)
    relabelled = split(bad)
    relabelled[0]["__metadata__"]["format_version"] = "2"  # the old rule does not switch the check off
    with pytest.raises(FormatError, match="tensor 'states' do not match"):
        decode(with_header(*relabelled), NAME, verify_checksums=True)


def test_version_2_files_keep_their_rule_and_still_read():
    b = compressed(version="2")
    header = parse_header(b, NAME)
    start, end = header.byte_range("states")
    # Version 2 hashed a compressed tensor as the uint8 blob it is stored as.
    want = xxhash.xxh3_64(f"states|U8|{end - start}|".encode() + b[start:end]).hexdigest()
    assert header.checksums["states"] == want
    assert equal(decode(b, NAME, verify_checksums=True).tensors, megabatch(torch.float32, rows=4, seq=16, d=8))


@pytest.mark.parametrize(
    "version,checksums,compress,message",
    [
        ("1", False, True, "labelled format version 1, .* yet it holds compressed tensors"),
        ("1", True, False, "labelled format version 1, .* yet it holds checksums"),
        ("0", False, False, "format_version '0'"),
    ],
)
def test_a_version_1_label_on_newer_fields_is_refused(version, checksums, compress, message):
    meta = {"format": "activault", "format_version": version}
    b = b"".join(encode(megabatch(), meta, checksums=checksums, compression=ZSTD_SMALL if compress else None))
    with pytest.raises(FormatError, match=f"{NAME}: corrupted header .{message}"):
        parse_header(b, NAME)


def test_a_codec_shape_beyond_the_stored_bytes_is_refused_before_anything_is_allocated():
    def alloc(shape, dtype):
        raise AssertionError(f"allocated {shape} {dtype}")

    huge = edit_codec(compressed(), shape=[4, 16, 2**33])  # 128 TiB from ~1 KiB
    with pytest.raises(FormatError, match=f"{NAME} 'states': the header says chunk 0 .* more than zstd can produce"):
        parse_header(huge, NAME)
    # Within zstd's ratio, the frames' declared sizes refuse it before the decoded tensor is allocated.
    wide = edit_codec(compressed(), shape=[4, 16, 32])
    want = f"{NAME} 'states': chunk 0 holds a frame of 256 bytes, the header describes 1024"
    with pytest.raises(FormatError, match=want):
        decode(wide, NAME, alloc=alloc)
    for bad in ({"shape": [4, 16, 8.0]}, {"shape": [4, True, 8]}, {"version": "1"}, {"chunk_tokens": 0}):
        with pytest.raises(FormatError, match=f"{NAME} 'states': corrupted codec description"):
            parse_header(edit_codec(compressed(), **bad), NAME)


def test_checksums_cannot_be_stripped_from_a_version_2_file():
    raw, body = split(blob())
    raw["__metadata__"] = {k: v for k, v in raw["__metadata__"].items() if k != "checksum.states"}
    with pytest.raises(FormatError, match="no valid checksum for tensor 'states'"):
        parse_header(with_header(raw, body), NAME)


# ---- header before body ----


class CountingStore(LocalStore):
    """A local store that counts the bytes handed out."""

    read = 0

    def get_range(self, key, start, end):
        out = super().get_range(key, start, end)
        self.read += out.nbytes
        return out

    def get(self, key):
        out = super().get(key)
        self.read += out.nbytes
        return out


@pytest.mark.parametrize("prefix", ["valid", "junk"])
def test_a_junk_multi_gigabyte_file_costs_one_small_read(tmp_path: Path, prefix: str):
    store = CountingStore(tmp_path)
    path = tmp_path / "h" / NAME
    path.parent.mkdir()
    path.write_bytes(blob() if prefix == "valid" else os.urandom(64))
    os.truncate(path, 3 << 30)  # sparse: 3 GiB on paper, nothing on disk
    with pytest.raises(FormatError, match=f"{NAME}: "):
        fetch_header(store, f"h/{NAME}", 3 << 30)
    assert store.read <= HEAD_READ


def test_fetch_header_is_the_header_parse_header_gives(tmp_path: Path):
    store = CountingStore(tmp_path)
    b = blob()
    store.put(f"h/{NAME}", b)
    got = fetch_header(store, f"h/{NAME}")
    assert isinstance(got, Header) and got == parse_header(b, store.url(f"h/{NAME}"))
    assert got.size == len(b) and (got.rows, got.seq_len, got.d_model) == (3, 5, 4)
    assert store.read < 1024


# ---- anything at all: a Header or a FormatError naming the file ----

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def decodes_to_the_stored_data_or_names_the_file(b: bytes) -> None:
    try:
        mb = decode(b, NAME, verify_checksums=True)
    except FormatError as e:
        assert str(e).startswith(NAME)
        return
    assert equal(mb.tensors, megabatch())


@FAST
@given(st.binary(max_size=3000))
def test_random_bytes_give_a_header_or_a_format_error(b: bytes):
    try:
        parse_header(b, NAME)
    except FormatError as e:
        assert str(e).startswith(NAME)


@FAST
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4), st.integers(-64, 64))
def test_mutated_bytes_decode_to_the_stored_data_or_a_format_error(edits, resize: int):
    b = bytearray(blob())
    for at, value in edits:
        b[at % len(b)] = value
    b = b[:resize] if resize < 0 else b + bytes(resize)
    decodes_to_the_stored_data_or_names_the_file(bytes(b))


@FAST
@given(
    st.sampled_from(["states", "input_ids", "positions", "__metadata__", "other"]),
    st.sampled_from(["dtype", "shape", "data_offsets", "checksum.states", "format_version", None]),
    json_values,
)
def test_mutated_headers_decode_to_the_stored_data_or_a_format_error(entry, field, value):
    raw, body = split(blob())
    if field is None:
        raw[entry] = value
    elif isinstance(raw.get(entry), dict):
        raw[entry][field] = value
    decodes_to_the_stored_data_or_names_the_file(with_header(raw, body))


def test_an_empty_object_is_named_without_a_ranged_read(tmp_path: Path):
    store = CountingStore(tmp_path)
    store.put(f"h/{NAME}", b"")
    with pytest.raises(FormatError, match=f"{NAME}: truncated file .0 bytes"):
        fetch_header(store, f"h/{NAME}")
    assert store.read == 0


# ---- provenance: the documents tensor (format version 4) ----


def with_documents(rows=3, seq=5) -> dict[str, torch.Tensor]:
    t = megabatch(rows=rows, seq=seq)
    t["documents"] = torch.arange(rows, dtype=torch.int64).repeat_interleave(seq).view(rows, seq)
    return t


def test_documents_round_trip_and_files_without_them_still_read():
    mb = decode(blob(with_documents()), NAME, verify_checksums=True)
    assert mb.header.version == FORMAT_VERSION >= PROVENANCE_SINCE
    assert torch.equal(mb.documents, with_documents()["documents"])
    old = decode(blob(), NAME, verify_checksums=True)  # format version 3: no documents
    assert old.header.version == 3 and old.documents is None and equal(old.tensors, megabatch())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("documents"), "labelled format version 4 but has no 'documents' tensor"),
        (lambda t: t.update(documents=t["documents"].to(torch.int32)), r"'documents' is \[3, 5\] int32"),
        (lambda t: t.update(documents=t["documents"][:2].contiguous()), r"'documents' is \[2, 5\] int64"),
    ],
)
def test_a_version_4_file_without_a_valid_documents_tensor_is_refused(edit, message):
    t = with_documents()
    edit(t)
    with pytest.raises(FormatError, match=f"{NAME}: {message}"):
        parse_header(blob(t, meta={"format": "activault", "format_version": "4"}), NAME)


def test_a_file_labelled_before_provenance_holding_documents_is_refused():
    with pytest.raises(FormatError, match="labelled format version 3, which has no 'documents'"):
        parse_header(blob(with_documents(), meta={"format": "activault", "format_version": "3"}), NAME)


def test_tampered_documents_fail_their_checksum():
    b = bytearray(blob(with_documents()))
    h = parse_header(b, NAME)
    a, _ = h.byte_range("documents")
    b[a] ^= 1  # document 0 -> 1 in the first token
    with pytest.raises(FormatError, match=f"{NAME}: the bytes of tensor 'documents' do not match"):
        decode(bytes(b), NAME, verify_checksums=True)


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
