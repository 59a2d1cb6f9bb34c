"""verify's checks of a run's files: a damaged header, a file unlike its hook's others, metadata.json
named when it is the broken part; with --deep, checksums, NaN/Inf, provenance order and stored norms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_inspection import HOOKS, compress_and_edit, with_hook_dims
from test_verify import problems_of, repair

from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.tools.recompress import convert_file
from activault.tools.verify import verify_run
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from activault.vault.records import REBUILD, header_metadata, parse_file_name
from support.collecting import run_cli
from support.synth import SynthRun, s3_env, write_synthetic_run


@pytest.fixture
def vault(tmp_path: Path) -> tuple[LocalStore, SynthRun]:
    store = LocalStore(tmp_path / "vault", fsync=False)
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


def test_verify_finds_a_truncated_file(vault) -> None:
    store, run = vault
    key = f"run/{HOOKS[0]}/{run.names[1]}"
    store.put(key, bytes(store.get(key))[:-100])
    problems = problems_of(store)
    assert any(f"{HOOKS[0]}/{run.names[1]}" in p and "truncated" in p and repair(0) in p for p in problems), problems


def test_a_file_of_another_dtype_is_named_not_metadata(vault) -> None:
    store, run = vault
    t = dict(run.files[HOOKS[0]][run.names[0]])
    t["states"] = t["states"].float()
    store.put(f"run/{HOOKS[0]}/{run.names[0]}", fmt.encode(t, {}))
    (problem,) = problems_of(store)
    assert problem.startswith(f"{HOOKS[0]}/{run.names[0]}: states are [rows, 16, 8] float32, most files")
    assert repair(0) in problem


def test_metadata_that_disagrees_with_every_file_is_named_as_the_broken_part(vault) -> None:
    store, _ = vault
    meta = json.loads(store.get_text(f"run/{HOOKS[1]}/metadata.json"))
    meta["d_model"] = 9
    meta["shape"][2] = 9
    store.put_text(f"run/{HOOKS[1]}/metadata.json", json.dumps(meta))
    (problem,) = problems_of(store)
    assert problem.startswith(f"{HOOKS[1]}/metadata.json says [rows, 16, 9] bfloat16, the files hold [rows, 16, 8]")
    assert "metadata.json is out of date, not the files" in problem and REBUILD in problem


# ---- --deep: checksums and NaN/Inf ----


def test_deep_verify_finds_a_single_flipped_bit_in_states(vault, capsys) -> None:
    store, run = vault
    key = f"run/{HOOKS[1]}/{run.names[2]}"
    b = bytearray(store.get(key))
    start, end = fmt.parse_header(b, key).byte_range("states")
    b[(start + end) // 2] ^= 0x01
    store.put(key, bytes(b))
    assert problems_of(store) == []  # headers, ids and positions are intact
    (problem,) = problems_of(store, deep=True)
    assert problem.startswith(f"{HOOKS[1]}/{run.names[2]}: the bytes of tensor 'states' do not match")
    assert repair(1) in problem
    rc, out, _ = run_cli(["verify", "--deep", str(store.root / "run")], capsys)
    assert rc == 1 and "checksums verified in 7 of 7 readable files" in out


def test_deep_verify_reads_old_files_without_checksums_and_says_so(vault, capsys) -> None:
    store, run = vault
    for h in HOOKS:
        t = run.files[h][run.names[0]]
        meta = {**header_metadata("run", h, 0, 0, "synthetic"), "format_version": "1"}
        store.put(f"run/{h}/{run.names[0]}", fmt.encode(t, meta, checksums=False))
    rc, out, _ = run_cli(["verify", "--deep", str(store.root / "run")], capsys)
    assert rc == 0 and "checksums verified in 6 of 8 readable files" in out
    assert "2 file(s) have no checksums (format version 1, written before checksums)" in out


def test_deep_verify_counts_tokens_with_nan_or_inf_per_hook(vault, capsys) -> None:
    store, run = vault
    t = {k: v.clone() for k, v in run.files[HOOKS[0]][run.names[1]].items()}
    t["states"][0, 0, 0] = float("nan")
    t["states"][0, 0, 1] = float("inf")  # the same token: counted once
    t["states"][1, 2, 3] = float("-inf")
    store.put(f"run/{HOOKS[0]}/{run.names[1]}", fmt.encode(t, header_metadata("run", HOOKS[0], 0, 1, "s")))
    v = verify_run(store, "run", deep=True)
    assert v.problems == [] and f"{HOOKS[0]}: 2 token(s) with NaN or Inf in 1 file(s), e.g. {run.names[1]}" in v.notes
    assert not any(HOOKS[1] in n and "NaN" in n for n in v.notes)
    assert torch.isnan(t["states"]).any()  # (the file really holds them)


# ---- hostile headers: the file is the broken part ----


def test_an_edited_codec_description_names_the_files_never_metadata(vault, capsys) -> None:
    """Every file of a hook edited from bf16 [4, 16, 8] to f32 [4, 16, 4] (the same bytes)."""
    store, run = vault
    for name in run.names:
        compress_and_edit(store, f"run/{HOOKS[0]}/{name}", dtype="F32", shape=[4, 16, 4])
    # --deep: each file fails its checksum, and none speaks for metadata.json.
    problems = problems_of(store, deep=True)
    assert len(problems) == len(run.names) and not any("metadata.json" in p for p in problems), problems
    for name, p in zip(sorted(run.names), problems, strict=True):
        assert p.startswith(f"{HOOKS[0]}/{name}: the bytes of tensor 'states' do not match")
        assert repair(int(name[1:6])) in p
    # With cfg.json's hook_dims, the headers alone are enough, and nothing is decoded from them.
    with_hook_dims(store, "run", dict.fromkeys(HOOKS, 8))
    for deep in (False, True):
        problems = problems_of(store, deep=deep)
        assert len(problems) == len(run.names) and not any(REBUILD in p for p in problems), problems
        for name, p in zip(sorted(run.names), problems, strict=True):
            assert p.startswith(f"{HOOKS[0]}/{name}: its header says states are [4, 16, 4] float32, cfg.json's")
            assert "not the run's records" in p and repair(int(name[1:6])) in p
    rc, out, _ = run_cli(["verify", str(store.root / "run")], capsys)
    assert rc == 1 and "metadata.json" not in out


def test_deep_verify_refuses_a_codec_shape_beyond_the_file_naming_it(vault) -> None:
    store, run = vault
    compress_and_edit(store, f"run/{HOOKS[1]}/{run.names[3]}", shape=[4, 16, 2**33])
    for deep in (False, True):
        (problem,) = problems_of(store, deep=deep)
        assert problem.startswith(f"{HOOKS[1]}/{run.names[3]}: the header says chunk 0")
        assert "more than zstd can produce" in problem and repair(1) in problem


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_a_file_recompressed_while_verify_reads_it_is_checked_whole(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recompress replaces a file (new offsets) between verify's header read and its ids read: the
    ids come from the version whose header was read (local: the file held open), or the file is
    read again (S3: If-Match refused), never from the other; so no "ids differ", no repair."""
    if where == "local":
        store: Store = LocalStore(tmp_path / "vault", fsync=False)
    else:
        moto_url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
        store = S3Store(f"s3://{bucket}", env=s3_env(moto_url))
    run = write_synthetic_run(store, "run", HOOKS, machines=2, files=2)
    victim = f"run/{HOOKS[1]}/{run.names[2]}"
    byte_range, sizes = fmt.Header.byte_range, []

    def recompress_then_range(self: fmt.Header, name: str) -> tuple[int, int]:
        if self.url == store.url(victim) and not sizes:
            sizes.append(None)  # once: convert_file decodes the file too
            sizes.append(convert_file(store, victim, codecs.Codec("zstd", chunk_bytes=256)))
        return byte_range(self, name)

    monkeypatch.setattr(fmt.Header, "byte_range", recompress_then_range)
    v = verify_run(store, "run")
    assert sizes[1][1] != sizes[1][0]  # replaced by a file of another size (and layout) after its header was read
    assert v.problems == [], v.problems
    assert verify_run(store, "run", deep=True).problems == []


def with_documents(store: LocalStore, run: SynthRun, name: str, first: int) -> None:
    """File `name` of every hook rewritten with documents `first`, `first + 1`, ... one per row."""
    for h in HOOKS:
        t = dict(run.files[h][name])
        rows, seq = t["input_ids"].shape
        t["documents"] = (first + torch.arange(rows, dtype=torch.int64)).repeat_interleave(seq).view(rows, seq)
        t["positions"] = torch.arange(seq, dtype=torch.int32).repeat(rows, 1)
        m = parse_file_name(name)
        assert m is not None
        store.put(f"run/{h}/{name}", fmt.encode(t, header_metadata("run", h, m[0], m[1], "s", provenance=True)))


def test_deep_verify_checks_provenance_order_across_a_machines_files(vault) -> None:
    store, run = vault
    mine = sorted(n for n in run.names if n.startswith("m00000"))
    with_documents(store, run, mine[0], 0)
    with_documents(store, run, mine[1], 100)
    assert not [p for p in problems_of(store, deep=True) if "provenance" in p]
    with_documents(store, run, mine[0], 500)  # machine 0's first file now after its second
    found = [p for p in problems_of(store, deep=True) if "provenance" in p]
    assert len(found) == len(HOOKS) and f"{mine[1]}: provenance starts at (document, position) (100, 0)" in found[0]
    assert repair(0) in found[0]


# ---- stored norms (format version 5) ----


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_deep_verify_catches_norms_that_lie_under_a_valid_checksum(where, request, tmp_path: Path) -> None:
    from activault.tools.recompress import recompress_run
    from support.norms import lying_norms
    from support.runstate import store_at

    store, _, _ = store_at(where, request, tmp_path)
    run = write_synthetic_run(store, "run", HOOKS, machines=2, files=2, documents=True)
    key = f"run/{HOOKS[1]}/{run.names[2]}"
    store.put(key, lying_norms(bytes(store.get(key)), key, (1, 4, 1e6)))  # a buggy writer: its checksum holds
    assert problems_of(store) == []  # headers, ids and positions are intact
    (problem,) = problems_of(store, deep=True)
    assert problem.startswith(
        f"{HOOKS[1]}/{run.names[2]}: its stored norms disagree with its states at row 1, column 4"
    )
    assert "checksums hold" in problem and f"`activault recompress {store.url('run')} --compression zstd`" in problem
    assert "--repair" not in problem  # the data is intact: nothing to collect again
    recompress_run(store, "run", codecs.Codec("zstd"))  # the advice: every file's norms computed again
    assert problems_of(store, deep=True) == []
