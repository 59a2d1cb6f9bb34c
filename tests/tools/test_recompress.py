"""tools/recompress.py: in-place recompression of a run, verified, resumable after a failure or a
SIGKILL and reversible to the very bytes collect wrote; every hook checked before anything is
converted (foreign objects skipped and counted, holes refused); a run still collecting is refused."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from test_inspection import compress_and_edit

from activault.errors import ConfigError, FormatError, LockedError
from activault.storage import LocalStore, Store
from activault.storage.lock import hold_task
from activault.storage.s3 import S3Store
from activault.tools.recompress import recompress_run, run_recompress
from activault.tools.verify import verify_run
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from support.interrupted import kill_when_reached
from support.synth import SynthRun, s3_env, write_synthetic_run

ZSTD_SMALL = codecs.Codec("zstd", chunk_bytes=256)  # many chunks in a tiny file, the last one partial
HOOKS3 = ["h1", "h2", "h3"]


def contents(store: Store, run: str = "run") -> dict[str, bytes]:
    return {e.key: bytes(store.get(e.key)) for e in store.list(run)}


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


def test_a_second_recompress_of_a_run_is_refused_while_the_first_runs(stores: tuple[Store, Store]) -> None:
    """Two at once would remove each other's temp files: the second is told who holds the run."""
    store, _ = stores
    write_synthetic_run(store, "run", ["h1"], machines=1, files=2)
    before = contents(store)
    with hold_task(store, "run", "recompress", "being recompressed"):
        with pytest.raises(LockedError, match=r"run 'run' is being recompressed by .*pid"):
            recompress_run(store, "run", ZSTD_SMALL, threads=1)
    assert contents(store) == before  # nothing converted
    recompress_run(store, "run", ZSTD_SMALL, threads=1)  # released: the next one runs


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
    # the current checksum rule; a file without `documents` stays below format version 4 (provenance)
    assert header.version == fmt.PROVENANCE_SINCE - 1 and verify_run(local, "run", deep=True).problems == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zstd_then_none_gives_back_the_very_bytes_collect_wrote(stores: tuple[Store, Store], dtype: torch.dtype):
    """float32 too: a compressed file lists `states` last, the writer first (equal widths keep their order)."""
    store = stores[0]
    run = write_synthetic_run(store, "run", HOOKS3, machines=2, files=2, dtype=dtype)
    keys = [f"run/{h}/{n}" for h in HOOKS3 for n in run.names]
    original = {k: bytes(store.get(k)) for k in keys}
    assert recompress_run(store, "run", ZSTD_SMALL).converted == len(keys)
    assert all(bytes(store.get(k)) != original[k] for k in keys)
    assert recompress_run(store, "run", None).converted == len(keys)
    assert {k: bytes(store.get(k)) for k in keys} == original


def test_foreign_objects_are_skipped_and_counted(stores: tuple[Store, Store], tmp_path: Path):
    store = stores[0]
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=2)
    store.put("run/h2/empty.safetensors", b"")
    store.put("run/h2/m00000-000009.safetensors", b"")  # empty, and no progress record counts it
    store.put("run/h2/notes.txt", b"not a megabatch")
    foreign = {"empty.safetensors": "empty", "m00000-000009.safetensors": "empty", "notes.txt": "not a megabatch"}
    if isinstance(store, LocalStore):
        (tmp_path / "a/run/h1/link.safetensors").symlink_to(tmp_path / "a/run/h1" / run.names[0])
        foreign["link.safetensors"] = "a link"
    s = recompress_run(store, "run", ZSTD_SMALL)
    assert s.converted == s.files == 2 * len(run.names)
    assert s.foreign == {
        store.url(f"run/{'h1' if n.startswith('link') else 'h2'}/{n}"): why for n, why in foreign.items()
    }
    assert bytes(store.get("run/h2/notes.txt")) == b"not a megabatch" and store.size("run/h2/empty.safetensors") == 0
    if isinstance(store, LocalStore):
        assert (tmp_path / "a/run/h1/link.safetensors").is_symlink()
    problems = verify_run(store, "run", deep=True).problems  # the converted files pass; verify names the rest
    assert problems and {p.split(":")[0].split("/")[-1] for p in problems} <= set(foreign)


def test_nothing_is_converted_until_every_hook_is_checked(stores: tuple[Store, Store], tmp_path: Path):
    store = stores[0]
    run = write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=2)
    before = contents(store)
    store.put("run/h2/zz.safetensors", b"\x08" + bytes(40))  # a megabatch by name, in the last hook
    with pytest.raises(FormatError, match="zz.safetensors"):
        recompress_run(store, "run", ZSTD_SMALL, threads=1)
    store.delete("run/h2/zz.safetensors")
    assert contents(store) == before  # h1 was not converted first
    hole = f"run/h2/{run.names[3]}"  # counted by machine 1's progress record
    store.put(hole, b"")
    message = (
        f"{store.url(hole)} is empty, yet machine 1's progress record counts it: a hole in the run; "
        "nothing converted. Restore the file from a copy, or delete"
    )
    with pytest.raises(FormatError, match=re.escape(message)):
        recompress_run(store, "run", ZSTD_SMALL, threads=1)
    assert contents(store) == {**before, hole: b""}


def test_a_counted_file_that_is_a_link_or_missing_is_a_hole(run: SynthRun, local: LocalStore, tmp_path: Path):
    victim = tmp_path / "run/h2" / run.names[1]
    victim.unlink()
    before = contents(local)
    with pytest.raises(FormatError, match=f"{run.names[1]} is missing, yet machine 0's progress record counts it"):
        recompress_run(local, "run", ZSTD_SMALL)
    victim.symlink_to(tmp_path / "run/h1" / run.names[1])
    with pytest.raises(FormatError, match=f"{run.names[1]} is a link, not a file, yet machine 0's"):
        recompress_run(local, "run", ZSTD_SMALL)
    victim.unlink()
    assert contents(local) == before  # nothing converted


KILLED_RECOMPRESS = """
    import sys
    from activault.storage import open_store
    from activault.storage.local import LocalStore
    from activault.storage.s3 import S3Store
    from activault.tools.recompress import recompress_run, run_recompress
    from activault.vault import codec

    files = 0

    def stop_on_third(data):
        global files
        files += 1
        return files == 3

    real_write, real_put = LocalStore._write, S3Store.put

    def write(self, path, data):
        if ".safetensors" in path.name and stop_on_third(data):
            blob = b"".join(bytes(p) for p in (data if isinstance(data, list) else [data]))
            path.write_bytes(blob[: len(blob) // 2])  # the temp file, half written
            stop_here()
        real_write(self, path, data)

    def put(self, key, data):
        if key.endswith(".safetensors") and stop_on_third(data):
            stop_here()
        real_put(self, key, data)

    LocalStore._write, S3Store.put = write, put
    recompress_run(open_store(sys.argv[1]), "run", codec.Codec("zstd", chunk_bytes=256), threads=1)
"""


def test_a_killed_recompress_is_finished_by_a_rerun_byte_identical(
    stores: tuple[Store, Store], tmp_path: Path, request: pytest.FixtureRequest
):
    killed, whole = stores
    for store in stores:
        write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=2, dtype=torch.float32)
    env = s3_env(request.getfixturevalue("moto_url")) if isinstance(killed, S3Store) else {}
    code = KILLED_RECOMPRESS.replace("sys.argv[1]", repr(killed.uri))
    kill_when_reached(code, tmp_path / "reached", env)
    left = sorted(p.name for p in (tmp_path / "a").rglob(".m*.tmp"))
    assert len(left) == isinstance(killed, LocalStore)  # the half-written temp file of the third file
    s = recompress_run(killed, "run", ZSTD_SMALL)
    assert s.leftovers == len(left) and s.skipped == 2 and s.converted == s.files - 2
    recompress_run(whole, "run", ZSTD_SMALL)
    assert contents(killed) == contents(whole) and not list((tmp_path / "a").rglob("*.tmp"))
    assert verify_run(killed, "run", deep=True).problems == []


def test_the_command_names_foreign_objects_and_removed_leftovers(
    run: SynthRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "run/h1/notes.txt").write_text("mine")
    (tmp_path / f"run/h2/.{run.names[0]}.0123abcd.tmp").write_bytes(b"half a file")  # a killed put's
    assert run_recompress(str(tmp_path / "run"), "zstd") == 0
    out = capsys.readouterr().out
    assert f"foreign   {tmp_path / 'run/h1/notes.txt'} (not a megabatch: not read)" in out
    assert "removed 1 unfinished temp file(s) of an earlier, killed attempt" in out
    assert f"{2 * len(run.names)} file(s) converted, 0 already zstd, 1 other object(s) skipped" in out
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "run/h1/notes.txt").read_text() == "mine"


def test_recompress_gives_format_4_files_norms_and_fp8_files_the_norms_of_their_values(
    stores: tuple[Store, Store],
) -> None:
    from activault.vault.norms import token_norms
    from support.norms import as_format_4

    store, _ = stores
    run = write_synthetic_run(store, "run", ["h1"], files=2, documents=True)
    collected = contents(store)
    as_format_4(store, "run", ["h1"], run.names)
    recompress_run(store, "run", codecs.Codec("zstd"))
    recompress_run(store, "run", None)
    assert contents(store) == collected  # format 4 files rewritten as collect writes format 5: the same bytes
    recompress_run(store, "run", codecs.Codec("fp8"))
    for name in run.names:
        mb = fmt.decode(store.get(f"run/h1/{name}"), name, verify_checksums=True)
        assert mb.header.version == fmt.FORMAT_VERSION and mb.norms is not None  # type: ignore[union-attr]
        assert not torch.equal(mb.states, run.files["h1"][name]["states"])
        assert torch.equal(mb.norms, token_norms(mb.states))
    assert verify_run(store, "run", deep=True).problems == []


def test_padding_holding_values_is_named_by_verify_and_zeroed_by_a_lossless_recompress(
    stores: tuple[Store, Store],
) -> None:
    """A file whose padding holds values (an earlier import kept a cache's there; the format stores
    zeros): verify --deep names it and the fix, and the fix gives back the bytes collect writes."""
    from support.norms import with_padding_values

    store, _ = stores
    run = write_synthetic_run(store, "run", ["h1"], files=2, documents=True)  # 3 padding tokens at the end
    collected, last = contents(store), run.names[-1]
    with_padding_values(store, "run", ["h1"], [last], 1.5)
    assert contents(store) != collected
    problems = verify_run(store, "run", deep=True).problems
    assert len(problems) == 1 and f"h1/{last}: 3 padding token(s) (position -1) hold non-zero states" in problems[0]
    assert f"`activault recompress {store.url('run')} --compression zstd`" in problems[0]
    recompress_run(store, "run", codecs.Codec("zstd"))
    recompress_run(store, "run", None)
    assert contents(store) == collected
    assert verify_run(store, "run", deep=True).problems == []


def test_fp8_keeps_every_non_finite_token_non_finite(stores: tuple[Store, Store]) -> None:
    """Tokens holding Inf (collect's on_nonfinite: warn stores them) stay non-finite through fp8,
    counted as before by verify and left out by the NaN/Inf filter (before: +Inf decoded as 0 and
    -Inf as a finite value, under norms that said the tokens were finite)."""
    from activault.vault.norms import token_norms

    store, _ = stores
    bad = [("h1", 0, 1, 3, math.inf), ("h1", 1, 2, 5, -math.inf), ("h1", 1, 0, 0, math.nan)]
    run = write_synthetic_run(store, "run", ["h1"], files=2, documents=True, nonfinite=bad)
    before = {n: run.files["h1"][n]["states"] for n in run.names}
    counted = [note for note in verify_run(store, "run", deep=True).notes if "NaN or Inf" in note]
    recompress_run(store, "run", codecs.Codec("fp8"))
    for name in run.names:
        mb = fmt.decode(store.get(f"run/h1/{name}"), name, verify_checksums=True)
        assert torch.equal(mb.states.isfinite(), before[name].isfinite())
        assert torch.equal(mb.norms.isfinite(), token_norms(before[name]).isfinite())  # type: ignore[union-attr]
    after = verify_run(store, "run", deep=True)
    assert after.problems == [] and [n for n in after.notes if "NaN or Inf" in n] == counted != []
