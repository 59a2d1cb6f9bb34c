"""tools/recompress.py: in-place recompression of a run, verified, resumable after a failure and
reversible to the very bytes collect wrote; a run still collecting is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_inspection import compress_and_edit

from activault.errors import ConfigError, FormatError
from activault.storage import LocalStore
from activault.tools.recompress import recompress_run
from activault.tools.verify import verify_run
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from support.synth import SynthRun

ZSTD_SMALL = codecs.Codec("zstd", chunk_bytes=256)  # many chunks in a tiny file, the last one partial


def test_recompress_in_place_is_verified_resumable_and_reversible(
    run: SynthRun, local: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*.safetensors"))}
    puts = 0
    real_put = LocalStore.put

    def failing_put(self: LocalStore, key: str, data: object) -> None:
        nonlocal puts
        if key.endswith(".safetensors"):
            puts += 1
            if puts == 4:
                raise OSError("disk full (injected)")
        real_put(self, key, data)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalStore, "put", failing_put)
    with pytest.raises(OSError, match="injected"):
        recompress_run(local, "run", ZSTD_SMALL, threads=1)
    monkeypatch.setattr(LocalStore, "put", real_put)
    seen: list[str] = []
    s = recompress_run(local, "run", ZSTD_SMALL, on_file=lambda f, what: seen.append(what))
    assert s.files == len(original) and s.skipped >= 3 and s.converted + s.skipped == s.files  # the 3 done before
    assert sorted(seen) == sorted(["converted"] * s.converted + ["skipped"] * s.skipped)
    assert all(fmt.CODECS_KEY.encode() in p.read_bytes()[:4096] for p in original)
    meta = json.loads((tmp_path / "run/h1/metadata.json").read_text())
    assert meta["compression"]["codec"] == "zstd"
    assert verify_run(local, "run", deep=True).problems == []
    assert recompress_run(local, "run", ZSTD_SMALL).skipped == len(original)
    recompress_run(local, "run", None)  # back to raw: the very bytes collect wrote
    assert {p: p.read_bytes() for p in original} == original


def test_recompress_refuses_a_run_still_collecting(run: SynthRun, local: LocalStore, tmp_path: Path) -> None:
    path = tmp_path / "run/progress/machine-00001.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "finished": False}))
    with pytest.raises(ConfigError, match=r"machines \[1\] .* have not finished"):
        recompress_run(local, "run", ZSTD_SMALL)


def test_recompress_refuses_an_edited_codec_description(run: SynthRun, local: LocalStore) -> None:
    key = f"run/h1/{run.names[0]}"
    edited = compress_and_edit(local, key, dtype="F16")  # bf16 bits read as f16: a valid header
    with pytest.raises(FormatError, match=f"{run.names[0]}: the bytes of tensor 'states' do not match"):
        recompress_run(local, "run", None, threads=1)
    assert bytes(local.get(key)) == edited  # never rewritten with fresh checksums


def test_recompress_rewrites_a_version_2_file_under_the_current_rule(run: SynthRun, local: LocalStore) -> None:
    key = f"run/h1/{run.names[0]}"
    mb = fmt.decode(local.get(key), key)
    local.put(key, fmt.encode(mb.tensors, {**mb.metadata, "format_version": "2"}, compression=ZSTD_SMALL))
    assert fmt.fetch_header(local, key).version == 2
    recompress_run(local, "run", codecs.Codec("zstd"))
    header = fmt.fetch_header(local, key)
    assert header.version == fmt.FORMAT_VERSION and verify_run(local, "run", deep=True).problems == []
