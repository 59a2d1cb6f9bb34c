"""Compressed megabatches: bit-exact round trips, valid safetensors, fp8's error bound, corrupt
chunks named, mixed runs read transparently, and collection with compression (off the model's
thread, statistics unchanged, resume byte-identical). In-place recompression: tests/tools/test_recompress.py."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zstandard
from safetensors import safe_open

from activault import RCache, TokenLoader
from activault.collection.pipeline import collect
from activault.errors import ConfigError, FormatError
from activault.storage import LocalStore
from activault.tools.recompress import convert_file
from activault.tools.verify import verify_run
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from activault.vault.writer_threads import Writer
from support.collecting import make_cfg, run_cli, tree_bytes
from support.killing import kill_after_files
from support.synth import SynthRun

ZSTD_SMALL = codecs.Codec("zstd", chunk_bytes=256)  # many chunks in a tiny file, the last one partial


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def special_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values of `dtype` with NaN, ±inf, -0, subnormals and extremes mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    flat = x.reshape(-1)
    info = torch.finfo(dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, info.tiny / 4, info.max, -info.max])
    n = min(flat.numel(), specials.numel())
    flat[:n] = specials[:n].to(dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1), (0, 4, 8), (2, 3, 0), (4, 33, 129), (11,), ()])
def test_zstd_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = special_values(shape, dtype)
    packed, frames = codecs.pack(x, ZSTD_SMALL)
    assert packed.dtype == dtype and packed.shape == list(shape) and len(frames) == len(packed.chunks)
    y = codecs.unpack(b"".join(frames), packed, "test")
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(bits(y), bits(x))


def test_integer_tensors_round_trip_too() -> None:
    x = torch.randint(-(2**31), 2**31 - 1, (5, 9, 13), dtype=torch.int32)
    packed, frames = codecs.pack(x, codecs.Codec("zstd", chunk_bytes=100))
    assert torch.equal(codecs.unpack(b"".join(frames), packed, "test"), x)


def test_compressed_file_is_valid_safetensors_and_decodes_exactly(tmp_path: Path) -> None:
    states = special_values((6, 16, 24), torch.bfloat16)
    ids = torch.randint(0, 1000, (6, 16), dtype=torch.int32)
    pos = torch.arange(16, dtype=torch.int32).repeat(6, 1)
    meta = {"format": "activault", "hook": "h"}
    data = b"".join(fmt.encode({"states": states, "input_ids": ids, "positions": pos}, meta, compression=ZSTD_SMALL))
    path = tmp_path / "m00000-000000.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:  # the reference reader: a uint8 blob plus raw ids and positions
        blob = f.get_tensor("states")
        assert blob.dtype == torch.uint8 and blob.dim() == 1
        assert torch.equal(f.get_tensor("input_ids"), ids) and torch.equal(f.get_tensor("positions"), pos)
        described = json.loads(f.metadata()[fmt.CODECS_KEY])["states"]
    assert described["dtype"] == "BF16" and described["shape"] == [6, 16, 24] and described["codec"] == "zstd"
    assert sum(described["chunks"]) == blob.numel() and len(described["chunks"]) > 3
    mb = fmt.decode(data, str(path), verify_checksums=True)
    tensors, got_meta = mb.tensors, mb.metadata
    assert torch.equal(bits(tensors["states"]), bits(states)) and tensors["states"].shape == states.shape
    assert torch.equal(tensors["input_ids"], ids) and got_meta["hook"] == "h"
    header = fmt.parse_header(data, "x")
    assert header.logical("states") == (torch.bfloat16, (6, 16, 24)) and header.d_model == 24


def test_fp8_error_is_bounded_and_bytes_halved() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 256, generator=g)
    x[:, :, 7] *= 40  # an outlier dimension, as in real residual streams
    x[3, 5] = 0  # a zero token decodes to zeros
    x = x.to(torch.bfloat16)
    codec = codecs.Codec("fp8")
    packed, frames = codecs.pack(x, codec)
    y = codecs.unpack(b"".join(frames), packed, "test")
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    err = codecs.token_errors(x, y)
    assert float(err.max()) <= codecs.FP8_MAX_TOKEN_ERROR and 0 < float(err.mean()) < 0.04
    assert torch.equal(y[3, 5], torch.zeros(256, dtype=torch.bfloat16))
    assert sum(packed.chunks) < 0.56 * x.numel() * 2
    with pytest.raises(ValueError, match="floating-point"):
        codecs.compress(torch.zeros(3, 4, dtype=torch.int32), codec)


def test_fp8_keeps_a_non_finite_value_non_finite() -> None:
    """e4m3fn has no Inf: an Inf is stored as NaN, never clamped to a finite value (a token of Infs
    decoded as zeros, a lone -Inf as minus the token's largest magnitude: finite norms the NaN/Inf
    filter passed); the token's finite values keep fp8's bound."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, generator=g).to(torch.bfloat16)
    x[0, 0] = math.inf
    x[0, 1, 3] = -math.inf
    x[0, 2, 5] = math.nan
    x[1, 0, :] = torch.tensor([math.inf, -math.inf, math.nan] + [0.0] * 13)
    packed, frames = codecs.pack(x, codecs.Codec("fp8"))
    y = codecs.unpack(b"".join(frames), packed, "test")
    assert torch.equal(y.isfinite(), x.isfinite())  # the same values non-finite, all now NaN
    assert bool(y[~x.isfinite()].isnan().all())
    finite = x.float().isfinite().all(-1)
    assert float(codecs.token_errors(x[finite], y[finite]).max()) <= codecs.FP8_MAX_TOKEN_ERROR
    kept = x[0, 1].float().isfinite()  # the -Inf's token: its other values keep the bound too
    err = (y[0, 1].float()[kept] - x[0, 1].float()[kept]).norm() / x[0, 1].float()[kept].norm()
    assert float(err) <= codecs.FP8_MAX_TOKEN_ERROR


def corrupt(data: bytes, described: dict, chunk: int, data_start: int, blob_start: int) -> bytearray:
    bad = bytearray(data)
    start = data_start + blob_start + sum(described["chunks"][:chunk])
    bad[start + described["chunks"][chunk] // 2] ^= 0x5A
    return bad


def test_corrupt_chunk_is_an_error_naming_file_and_chunk(run: SynthRun, local: LocalStore, tmp_path: Path) -> None:
    key = f"run/h1/{run.names[0]}"
    convert_file(local, key, ZSTD_SMALL)
    data = bytes(local.get(key))
    header = fmt.parse_header(data, key)
    described = json.loads(header.metadata[fmt.CODECS_KEY])["states"]
    bad = corrupt(data, described, 2, header.data_offset, header.tensors["states"].start)
    with pytest.raises(
        FormatError, match=r"m00000-000000\.safetensors 'states': chunk 2 \(bytes \d+\.\.\d+\) is corrupted"
    ):
        fmt.decode(bad, key)
    local.put(key, bad)
    with RCache(tmp_path / "run" / "h1", buffer_size=1) as cache, pytest.raises(FormatError, match="chunk 2") as e:
        list(cache)
    assert str(tmp_path / "run/h1/m00000-000000.safetensors") in str(e.value)
    # A chunk table that does not cover the stored bytes is caught from the header alone (verify).
    short = {**described, "chunks": described["chunks"][:-1]}
    with pytest.raises(FormatError, match="inconsistent shape and chunk table"):
        codecs.parse(short, header.tensors["states"].nbytes, fmt.DTYPES, key)
    # and the checksum finds the flipped byte even before the chunk is decoded
    with pytest.raises(FormatError, match="checksum"):
        fmt.decode(bad, key, verify_checksums=True)


def test_a_codec_shape_beyond_the_file_is_named_by_readers(run: SynthRun, local: LocalStore, tmp_path: Path) -> None:
    """d = 2^33 in the codec description (128 TiB from ~1 KiB), metadata.json gone: one FormatError
    naming the file and the chunk, before anything is allocated."""
    key = f"run/h1/{run.names[0]}"  # the first file: the one a reader sizes its buffers from
    convert_file(local, key, ZSTD_SMALL)
    raw, body = split_file(bytes(local.get(key)))
    described = json.loads(raw["__metadata__"][fmt.CODECS_KEY])
    described["states"]["shape"][-1] = 2**33
    raw["__metadata__"][fmt.CODECS_KEY] = json.dumps(described)
    head = json.dumps(raw).encode()
    local.put(key, struct.pack("<Q", len(head)) + head + body)
    local.delete("run/h1/metadata.json")
    want = f"{tmp_path / key} 'states': the header says chunk 0 .* more than zstd can produce"
    with pytest.raises(FormatError, match=want), RCache(tmp_path / "run" / "h1", buffer_size=1) as cache:
        list(cache)
    with pytest.raises(FormatError, match=want):
        fmt.fetch_header(local, key)
    with (
        pytest.raises(FormatError, match=want),
        TokenLoader(tmp_path / "run", hooks=["h1", "h2"], batch_tokens=16) as tl,
    ):
        list(tl)


def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def read_all(uri: Path, **kw) -> dict[str, torch.Tensor]:
    with RCache(uri, return_ids=True, **kw) as cache:
        items = list(cache)
    return {k: torch.cat([b[k] for b in items]) for k in ("states", "input_ids", "positions")}


def test_mixed_run_reads_as_uncompressed(run: SynthRun, local: LocalStore, tmp_path: Path) -> None:
    before = read_all(tmp_path / "run" / "h1")
    with TokenLoader(tmp_path / "run", hooks=["h1", "h2"], batch_tokens=16, seed=3, center=True) as loader:
        want = [dict(b) for b in loader]
    for i, name in enumerate(run.names):  # every other file compressed, with two chunk sizes
        if i % 2 == 0:
            for h in run.hooks:
                convert_file(local, f"run/{h}/{name}", ZSTD_SMALL if i % 4 == 0 else codecs.Codec("zstd"))
    after = read_all(tmp_path / "run" / "h1")
    assert all(torch.equal(bits(after[k]), bits(before[k])) for k in before)
    with TokenLoader(tmp_path / "run", hooks=["h1", "h2"], batch_tokens=16, seed=3, center=True) as loader:
        got = [dict(b) for b in loader]
    assert len(got) == len(want) and all(torch.equal(g[h], w[h]) for g, w in zip(got, want, strict=True) for h in g)
    problems = verify_run(local, "run", deep=True).problems
    assert problems == []


def test_writer_runs_a_builder_on_its_own_threads(local: LocalStore) -> None:
    where: list[str] = []

    def build() -> list[bytes]:
        where.append(threading.current_thread().name)
        return [b"abc"]

    writer = Writer(local, threads=2)
    writer.write("x/one", build)
    writer.close()
    assert where and where[0].startswith("activault-write") and local.get("x/one") == b"abc"


def test_collect_with_compression_matches_raw(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model_dir("llama")
    compressing: list[str] = []
    real_pack = codecs.pack

    def spy(*args, **kw):
        compressing.append(threading.current_thread().name)
        return real_pack(*args, **kw)

    monkeypatch.setattr(codecs, "pack", spy)
    raw = collect(make_cfg(model, tmp_path / "raw"), show_progress=False)
    up = {"compression": "zstd", "compression_chunk_kib": 8}
    with caplog.at_level("INFO", logger="activault"):
        packed = collect(make_cfg(model, tmp_path / "zstd", upload=up), show_progress=False)
    assert "compression  zstd: assumed 0.85 of raw bytes for float32" in caplog.text  # states 0.84, ids etc. raw
    assert "compression  measured on the first file: models.layers.1.post 0." in caplog.text
    assert compressing and all(n.startswith("activault-write") for n in compressing)  # never the model's thread
    assert packed.bytes_written < raw.bytes_written and packed.tokens == raw.tokens
    for hook in ("models.layers.1.post", "models.layers.0.mlp.post"):
        a, b = tmp_path / "raw/run" / hook, tmp_path / "zstd/run" / hook
        assert (a / "statistics.json").read_text() == (b / "statistics.json").read_text()
        assert json.loads((b / "metadata.json").read_text())["compression"]["codec"] == "zstd"
        for f in sorted(a.glob("*.safetensors")):
            x = fmt.decode(f.read_bytes(), f.name).tensors
            mb = fmt.decode((b / f.name).read_bytes(), f.name)
            y, meta = mb.tensors, mb.metadata
            assert fmt.CODECS_KEY in meta and all(torch.equal(bits(x[k]), bits(y[k])) for k in x)
    assert verify_run(LocalStore(tmp_path / "zstd"), "run", deep=True).problems == []


@pytest.mark.slow
def test_resume_with_compression_is_byte_identical(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    over = {
        "data": {"n_batches": 16, "seq_length": 128, "batch_size": 8},
        "upload": {"batches_per_upload": 1, "compression": "zstd", "compression_chunk_kib": 16},
    }
    collect(make_cfg(model, tmp_path / "ref", **over), show_progress=False)
    want = tree_bytes(tmp_path / "ref/run")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(make_cfg(model, tmp_path / "killed", **over).model_dump(mode="json")))
    progress = tmp_path / "killed/run/progress/machine-00000.json"
    kills = kill_after_files(path, progress, (2, 6))  # kill after this many files, then resume
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    done = subprocess.run(
        [sys.executable, "-m", "activault", "collect", "--config", str(path), "--quiet"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    got = tree_bytes(tmp_path / "killed/run")
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []
    assert any(fmt.CODECS_KEY.encode() in v[:4096] for k, v in got.items() if k.endswith(".safetensors"))


def test_config_and_estimate_name_the_codec(tiny_model_dir, tmp_path: Path) -> None:
    from activault.collection.preflight import estimate_lines

    model = tiny_model_dir("llama")
    with pytest.raises(ConfigError, match="upload_config.compression"):
        make_cfg(model, tmp_path, upload={"compression": "gzip"})
    raw = estimate_lines(make_cfg(model, tmp_path))
    lines = estimate_lines(make_cfg(model, tmp_path, upload={"compression": "zstd"}))
    note = next(line for line in lines if line.startswith("compression"))
    assert "assumed 0.8" in note and "float32" in note and not any(x.startswith("compression") for x in raw)
    total = {line.split()[0]: line for line in lines}["total"]
    assert total != {line.split()[0]: line for line in raw}["total"]


def test_inspect_and_shell_describe_compressed_files(run: SynthRun, local: LocalStore, tmp_path: Path, capsys) -> None:

    from activault.tools.shell import Shell

    rc, out, _ = run_cli(["recompress", str(tmp_path / "run"), "--compression", "zstd", "--chunk-kib", "1"], capsys)
    assert rc == 0 and f"{len(run.names) * 2} file(s) converted, 0 already zstd" in out
    rc, out, _ = run_cli(["inspect", str(tmp_path / "run/h1" / run.names[0])], capsys)
    assert rc == 0 and "states: [4, 16, 8] bfloat16  (stored zstd level 1," in out
    out_file = io.StringIO()
    shell = Shell(local, out=out_file)
    shell.run_line("cd run")
    shell.run_line("sizecheck")
    text = out_file.getvalue()
    assert "zstd-compressed: sizes vary" in text and "odd size" not in text


def test_the_documented_layout_decodes_without_activault(tmp_path: Path) -> None:
    import re

    states = special_values((5, 16, 40), torch.bfloat16)
    tensors = {"states": states, "input_ids": torch.zeros(5, 16, dtype=torch.int32)}
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"".join(fmt.encode(tensors, {}, compression=codecs.Codec("zstd", chunk_bytes=1000))))
    doc = (Path(__file__).resolve().parents[2] / "docs/format.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc[doc.index("## Compressed states") :], re.S)
    assert snippet is not None
    scope: dict = {"path": str(path)}
    exec(snippet.group(1), scope)  # the docs' reader: safetensors, numpy and zstandard only
    assert torch.equal(torch.from_numpy(scope["raw"]), bits(states))


def packed_bf16(tokens: int = 64, d: int = 32, chunk_bytes: int = 256) -> tuple[torch.Tensor, codecs.Packed, bytes]:
    x = special_values((tokens, d), torch.bfloat16)
    packed, frames = codecs.pack(x, codecs.Codec("zstd", chunk_bytes=chunk_bytes))
    return x, packed, b"".join(frames)


def test_a_chunk_decodes_alone_from_its_own_bytes_in_any_order() -> None:
    x, packed, blob = packed_bf16()
    out = torch.full_like(x, 7)
    spans = packed.spans()
    assert spans[0][0] == 0 and spans[-1][1] == len(blob) and len(spans) == len(packed.chunks)
    for i in reversed(range(len(spans))):  # as ranges arrive, in any order
        a, b = spans[i]
        codecs.decode_chunk(blob[a:b], packed, i, out, "t")
    assert torch.equal(bits(out), bits(x))
    a, b = spans[2]
    bad = bytearray(blob[a:b])
    bad[len(bad) // 2] ^= 0x5A
    with pytest.raises(FormatError, match=rf"t: chunk 2 \(bytes {a}\.\.{b}\) is corrupted"):
        codecs.decode_chunk(bad, packed, 2, out, "t")
    with pytest.raises(ValueError, match=f"chunk 2 is {b - a} bytes"):
        codecs.decode_chunk(blob[a : b + 1], packed, 2, out, "t")
    with pytest.raises(ValueError, match="out must be"):
        codecs.decode_chunk(blob[a:b], packed, 2, out.float(), "t")
    with pytest.raises(IndexError):
        codecs.decode_chunk(blob[a:b], packed, len(spans), out, "t")


def test_zstd_and_the_plane_merge_let_other_threads_run() -> None:
    """With the interpreter's thread switching off, the main thread can only run while the worker
    is inside a call that releases the GIL: it then sees the work unfinished."""
    data = os.urandom(4 << 20) + bytes(28 << 20)
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
    out = bytearray(len(data))
    planes = np.frombuffer(data, np.uint8)
    merged = torch.empty(len(data) // 2, dtype=torch.bfloat16)

    def zstd() -> None:
        with zstandard.ZstdDecompressor().stream_reader(frame) as r:
            r.readinto(out)

    def merge() -> None:  # a whole chunk's decode: mostly the plane merge, the frame is tiny
        frames = [zstandard.ZstdCompressor(level=1, write_checksum=True).compress(planes.data)]
        codecs.decompress_into(frames[0], [len(frames[0])], merged.shape[0], "zstd", merged, "t", threads=1)

    def python() -> None:
        sum(range(3_000_000))

    def finished_before_main_ran(work, rounds: int = 1) -> bool:
        # `rounds` calls in a row: a busy machine may leave the main thread waiting for a core
        # while one call runs, never while `rounds` of them do, unless the GIL holds it back.
        done, started = [False], threading.Event()

        def run() -> None:
            started.set()
            for _ in range(rounds):
                work()
            done[0] = True

        old = sys.getswitchinterval()
        sys.setswitchinterval(1000)
        try:
            t = threading.Thread(target=run)
            t.start()
            started.wait()
            seen = done[0]
            t.join()
        finally:
            sys.setswitchinterval(old)
        return seen

    assert finished_before_main_ran(python)  # the probe sees a thread that holds the GIL
    assert not finished_before_main_ran(zstd, rounds=50)
    assert not finished_before_main_ran(merge, rounds=50)


def test_decode_limit_is_decoded_bytes_over_the_fastest_timed_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    x, packed, blob = packed_bf16()
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])  # rounds of 0.5, 0.25 and 1 s
    monkeypatch.setattr(codecs.time, "perf_counter", lambda: next(ticks))
    assert codecs.decode_limit(blob, packed, threads=1, rounds=3) == x.numel() * 2 / 0.25
