"""Checksums: a flipped bit, an edited description or a stripped checksum fails naming file and tensor."""

from __future__ import annotations

import json

import pytest
import torch
import xxhash

from activault.errors import FormatError
from activault.vault.checksums import check_checksums
from activault.vault.header import parse_header
from activault.vault.megabatch import decode
from support.megabatches import (
    NAME,
    blob,
    compressed,
    edit_codec,
    equal,
    megabatch,
    split,
    with_documents,
    with_header,
)


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


def test_checksums_cannot_be_stripped_from_a_version_2_file():
    raw, body = split(blob())
    raw["__metadata__"] = {k: v for k, v in raw["__metadata__"].items() if k != "checksum.states"}
    with pytest.raises(FormatError, match="no valid checksum for tensor 'states'"):
        parse_header(with_header(raw, body), NAME)


def test_tampered_documents_fail_their_checksum():
    b = bytearray(blob(with_documents()))
    h = parse_header(b, NAME)
    a, _ = h.byte_range("documents")
    b[a] ^= 1  # document 0 -> 1 in the first token
    with pytest.raises(FormatError, match=f"{NAME}: the bytes of tensor 'documents' do not match"):
        decode(bytes(b), NAME, verify_checksums=True)


BAD_HEX = ["0123456789ABCDEF", "0123456789abcdeg", " 123456789abcdef", "0123456789abcde\n", "0" * 15]


@pytest.mark.parametrize("value", BAD_HEX)
def test_a_checksum_that_is_not_16_lowercase_hex_digits_is_refused(value):
    raw, body = split(blob())
    raw["__metadata__"]["checksum.input_ids"] = value
    with pytest.raises(FormatError, match="no valid checksum for tensor 'input_ids'"):
        parse_header(with_header(raw, body), NAME)
