"""The header's one validator: each inconsistency named, header before body, any bytes a Header or a FormatError."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activault.errors import FormatError
from activault.storage import LocalStore
from activault.vault.header import HEAD_READ, Header, fetch_header, parse_header
from activault.vault.megabatch import decode, encode
from support.megabatches import (
    NAME,
    ZSTD_SMALL,
    blob,
    compressed,
    edit_codec,
    equal,
    megabatch,
    split,
    with_documents,
    with_header,
)


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
        (edit("states", shape=[3, -5, 4]), "shape must be at most 8 non-negative integers"),
        (edit("states", shape=[3, 5, 2**48]), "shape must be at most 8 non-negative integers"),
        (edit("states", shape=[1] * 9), "shape must be at most 8 non-negative integers"),
        (edit("states", data_offsets=[0, True]), "data_offsets must be two non-negative integers"),
        (edit("states", data_offsets=[-1, 119]), "data_offsets must be two non-negative integers"),
        (edit("states", dtype=["BF16"]), "unknown dtype"),
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


@pytest.mark.parametrize("value", [7, None, ["5"]])
def test_metadata_values_must_be_strings(value):
    raw, body = split(blob())
    raw["__metadata__"]["run_name"] = value
    with pytest.raises(FormatError, match=f"{NAME}: corrupted header .__metadata__ must map names to strings"):
        parse_header(with_header(raw, body), NAME)


def test_parsing_a_header_builds_no_json_decoder(monkeypatch):
    # json.loads with a hook builds a decoder and its scanner per call: ~5 us of every file's ~25.
    b, built = blob(), []
    real = json.JSONDecoder.__init__
    monkeypatch.setattr(json.JSONDecoder, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    headers = [parse_header(b, NAME) for _ in range(3)]
    assert built == [] and headers[0] == headers[2] and headers[0].metadata is not headers[2].metadata
