"""Stored token norms (format version 5): computed by the encoder from the stored values, exact to
float32 rounding, checked by the validator and the checksums, caught when they lie."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from activault.errors import FormatError
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from activault.vault.norms import NORMS, NORMS_SINCE, check_norms, norm_rtol, token_norms
from support.norms import as_format_4, lying_norms
from support.synth import s3_env, write_synthetic_run

NAME = "m00000-000000.safetensors"


def tensors(dtype: torch.dtype = torch.bfloat16, rows: int = 3, seq: int = 5, d: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "states": (torch.randn(rows, seq, d, generator=g) * 3).to(dtype),
        "input_ids": torch.randint(0, 1000, (rows, seq), generator=g, dtype=torch.int32),
        "positions": torch.arange(seq, dtype=torch.int32).repeat(rows, 1),
        "documents": torch.arange(rows, dtype=torch.int64).repeat_interleave(seq).view(rows, seq),
    }


def blob(t: dict[str, torch.Tensor], version: int = fmt.FORMAT_VERSION, codec: codecs.Codec | None = None) -> bytes:
    return b"".join(fmt.encode(t, {"format": "activault", "format_version": str(version)}, compression=codec))


def exact(states: torch.Tensor) -> np.ndarray:
    """Each token's norm from math.fsum of its squares in float64 (exact for float32 values and
    narrower), rounded to float32 once."""
    x = states.double().reshape(-1, states.shape[-1]).tolist()
    return np.array([math.sqrt(math.fsum(v * v for v in row)) for row in x], dtype=np.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_norms_equal_an_independent_computation(dtype: torch.dtype) -> None:
    t = tensors(dtype, rows=40, seq=8, d=300)
    before = t["states"].clone()
    got = token_norms(t["states"])
    assert torch.equal(t["states"], before)  # read, never squared in place
    assert got.dtype == torch.float32 and got.shape == (40, 8)
    # Within the bound of a float32 sum of d terms (norm_rtol), and in practice far closer.
    err = np.abs(got.reshape(-1).numpy() - exact(t["states"])) / exact(t["states"])
    assert err.max() <= norm_rtol(300) / 2 and np.median(err) < 1e-6


def test_norms_are_the_same_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from activault.vault import norms

    x = torch.randn(50, 7, 33).to(torch.bfloat16)
    whole = token_norms(x)
    monkeypatch.setattr(norms, "_CHUNK", 33 * 8 * 3)  # three tokens at a time
    assert torch.equal(token_norms(x), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_gives_nan_inf_gives_inf_and_padding_zero(dtype: torch.dtype) -> None:
    x = torch.randn(6, 8).to(dtype)
    x[0, 2] = float("nan")
    x[1, 3] = float("-inf")
    x[2, 0], x[2, 1] = float("inf"), float("nan")
    x[3] = 0  # padding: its stored states are zero
    x[4] = 1e20  # finite, but its squares (1e40) overflow float32: an Inf norm
    x[5] = 1e18  # its sum of squares (8e36) does not
    n = token_norms(x)
    assert n[0].isnan() and n[1] == math.inf and n[2].isnan() and n[3] == 0 and n[4] == math.inf
    assert n[5] == pytest.approx(1e18 * math.sqrt(8), rel=1e-2) and bool(x[4].isfinite().all())


def test_a_version_5_file_stores_the_norms_of_its_states_checksummed() -> None:
    t = tensors()
    data = blob(t)
    mb = fmt.decode(data, NAME, verify_checksums=True)
    assert mb.header.version == fmt.FORMAT_VERSION == NORMS_SINCE
    assert mb.norms is not None and torch.equal(mb.norms, token_norms(t["states"]))
    assert fmt.CHECKSUM_KEY + NORMS in mb.metadata
    assert all(torch.equal(mb.tensors[k], v) for k, v in t.items())
    bad = bytearray(data)
    a, _ = mb.header.byte_range(NORMS)
    bad[a] ^= 1
    with pytest.raises(FormatError, match=f"{NAME}: the bytes of tensor 'norms' do not match"):
        fmt.decode(bytes(bad), NAME, verify_checksums=True)


def test_norms_passed_in_are_never_stored_as_given() -> None:
    t = tensors()
    lie = {**t, NORMS: torch.zeros(3, 5)}
    assert torch.equal(fmt.decode(blob(lie), NAME).norms, token_norms(t["states"]))  # type: ignore[arg-type]
    old = fmt.decode(blob(lie, version=4), NAME, verify_checksums=True)  # a version 4 file has none
    assert old.norms is None and old.header.version == 4 and set(old.tensors) == set(t)


def test_compressed_files_store_the_norms_of_what_they_decode_to() -> None:
    t = tensors(rows=4, seq=16, d=64)
    zstd = fmt.decode(blob(t, codec=codecs.Codec("zstd", chunk_bytes=512)), NAME, verify_checksums=True)
    assert torch.equal(zstd.norms, token_norms(t["states"]))  # type: ignore[arg-type]
    fp8 = fmt.decode(blob(t, codec=codecs.Codec("fp8", chunk_bytes=512)), NAME, verify_checksums=True)
    assert not torch.equal(fp8.states, t["states"])  # lossy: the stored values differ...
    assert torch.equal(fp8.norms, token_norms(fp8.states))  # type: ignore[arg-type]  # ...and the norms are theirs


def edited(t: dict[str, torch.Tensor], version: int, **change: torch.Tensor | None) -> bytes:
    """A file labelled `version` holding `t` with tensors replaced (None: removed), each checksummed:
    what a writer of other rules would leave."""
    body = {k: v.contiguous() for k, v in {**t, **change}.items() if v is not None}
    names = sorted(body, key=lambda n: -body[n].element_size())
    meta = {"format": "activault", "format_version": str(version), "checksum": fmt.CHECKSUM}
    header: dict[str, object] = {"__metadata__": meta}
    at = 0
    for n in names:
        data = fmt.tensor_bytes(body[n])
        meta[fmt.CHECKSUM_KEY + n] = fmt.checksum(n, body[n].dtype, body[n].shape, data)
        header[n] = {
            "dtype": fmt.CODES[body[n].dtype],
            "shape": list(body[n].shape),
            "data_offsets": [at, at + data.nbytes],
        }
        at += data.nbytes
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(bytes(fmt.tensor_bytes(body[n])) for n in names)


@pytest.mark.parametrize(
    "version,change,message",
    [
        (5, {NORMS: None}, "labelled format version 5 but has no 'norms' tensor"),
        (4, {NORMS: torch.zeros(3, 5)}, "labelled format version 4, which has no 'norms' tensor, yet it holds one"),
        (5, {NORMS: torch.zeros(3, 5, dtype=torch.float64)}, r"'norms' is \[3, 5\] float64, expected \[3, 5\] float32"),
        (5, {NORMS: torch.zeros(2, 5)}, r"'norms' is \[2, 5\] float32, expected \[3, 5\] float32"),
    ],
)
def test_the_validator_requires_norms_from_version_5_only(
    version: int, change: dict[str, torch.Tensor | None], message: str
) -> None:
    t = {**tensors(), NORMS: torch.zeros(3, 5)}
    with pytest.raises(FormatError, match=f"{NAME}: .*{message}"):
        fmt.parse_header(edited(t, version, **change), NAME)


def test_a_newer_format_is_refused_and_version_4_still_reads() -> None:
    t = tensors()
    with pytest.raises(FormatError, match="format version 6, this one reads up to 5.*upgrade activault"):
        fmt.parse_header(edited({**t, NORMS: torch.zeros(3, 5)}, 6), NAME)
    old = fmt.decode(blob(t, version=4), NAME, verify_checksums=True)
    assert old.header.version == 4 and old.norms is None and torch.equal(old.documents, t["documents"])  # type: ignore[arg-type]
    assert fmt.relabelled(old.metadata)["format_version"] == "5"  # a rewrite gets norms


def test_check_norms_allows_rounding_and_names_a_lie() -> None:
    states = tensors(torch.float32)["states"]
    norms = token_norms(states)
    check_norms(states, torch.nextafter(norms, torch.full_like(norms, math.inf)), NAME)  # one step off: allowed
    check_norms(states, norms * (1 + norm_rtol(16) / 2), NAME)  # another summation order's difference
    nan = states.clone()
    nan[1, 2, 0] = float("nan")
    check_norms(nan, token_norms(nan), NAME)  # NaN where NaN
    lie = norms.clone()
    lie[2, 3] *= 1.001
    with pytest.raises(FormatError, match=f"{NAME}: its stored norms disagree with its states at row 2, column 3"):
        check_norms(states, lie, NAME, "s3://b/run")
    lie = token_norms(nan)
    lie[1, 2] = 1.0  # a NaN token's norm hidden: the NaN/Inf filter would keep it
    with pytest.raises(FormatError, match="row 1, column 2 .*recompress s3://b/run --compression zstd"):
        check_norms(nan, lie, NAME, "s3://b/run")


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path, fsync=False)
    url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
    return S3Store(f"s3://{bucket}", env=s3_env(url))


def test_the_run_writer_stores_norms_and_format_4_copies_have_none(store: Store) -> None:
    run = write_synthetic_run(store, "r", ["h1", "h2"], files=2, documents=True, nonfinite=[("h1", 1, 0, 2, 1e30)])
    for h in run.hooks:
        for name in run.names:
            mb = fmt.decode(store.get(f"r/{h}/{name}"), name, verify_checksums=True)
            assert mb.header.version == 5 and mb.norms is not None  # type: ignore[union-attr]
            assert torch.equal(mb.norms, token_norms(run.files[h][name]["states"]))
            assert bool((mb.norms[run.files[h][name]["positions"] < 0] == 0).all())  # padding: 0
    as_format_4(store, "r", run.hooks, run.names)
    for name in run.names:
        mb = fmt.decode(store.get(f"r/h1/{name}"), name, verify_checksums=True)
        assert mb.header.version == 4 and mb.norms is None
        assert torch.equal(mb.states, run.files["h1"][name]["states"])


def test_a_lying_norm_keeps_a_valid_checksum_and_check_norms_catches_it() -> None:
    t = tensors()
    data = lying_norms(blob(t), NAME, (0, 1, 0.5))
    mb = fmt.decode(data, NAME, verify_checksums=True)  # the buggy writer's checksum holds
    assert mb.norms is not None and float(mb.norms[0, 1]) == 0.5
    with pytest.raises(FormatError, match="row 0, column 1"):
        check_norms(mb.states, mb.norms, NAME)
