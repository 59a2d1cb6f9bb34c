"""integrations/saelens_cache/exporter.py: a run's hooks as a SAELens activation cache, read back here
with `datasets` itself: the same states (bfloat16 exactly as float32), ids and positions, rows holding
padding exported whole (every real token) and listed in the sidecar, and atomic: a refused or failed
export leaves nothing, a link as destination is refused before the run is read, and a killed
export's folder is removed by the rerun, which writes the same bytes. Its layout is the one SAELens
writes, and SAELens's ActivationsStore trains from it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.integrations.saelens_cache.exporter import _clear_leftovers, export_saelens
from activault.integrations.saelens_cache.importer import import_saelens
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from support.integrations import HOOKS, saelens_cache
from support.interrupted import kill_when_reached
from support.synth import SynthRun, s3_env, write_synthetic_run

COLUMNS = {"h1": "blocks.0.hook_resid_post", "h2": "blocks.0.hook_mlp_out"}


def expected(run: SynthRun, hook: str, key: str = "states") -> torch.Tensor:
    """`key` of the rows an export writes: every row, padding included."""
    return run.tensor(hook, key)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_cache_holds_the_runs_rows_bit_for_bit(run: SynthRun, local: LocalStore, tmp_path: Path):
    out = tmp_path / "cache"
    result = export_saelens(str(local.root / "run"), ["h1", "h2"], out, columns=COLUMNS, positions=True)
    ds = load_from_disk(str(out)).with_format("numpy")
    assert ds.num_rows == result.rows == len(expected(run, "h1"))
    for hook, column in COLUMNS.items():
        assert ds.features[column].dtype == "float32"  # Arrow has no bfloat16: float32 holds it exactly
        assert np.array_equal(ds[column], expected(run, hook).float().numpy())
    assert np.array_equal(ds["token_ids"], expected(run, "h1", "input_ids").numpy())
    assert np.array_equal(ds["positions"], expected(run, "h1", "positions").numpy())
    assert result.tokens == ds.num_rows * run.tensor("h1").shape[1] and result.arrow_files == 1
    assert result.out_dir == str(out) and leftovers(tmp_path) == []


def test_rows_holding_padding_are_exported_whole_and_their_padding_listed(
    run: SynthRun, local: LocalStore, tmp_path: Path
):
    result = export_saelens(str(local.root / "run"), "h1", tmp_path / "cache")
    pos = run.tensor("h1", "positions")
    padded = ~(pos >= 0).all(dim=1)
    assert result.padding_rows == int(padded.sum()) == 2, "one row per machine's last file"
    assert result.padding_tokens == int((pos < 0).sum()) == 6
    assert result.rows == pos.shape[0]  # was: the 2 rows dropped, with their 26 real tokens
    want = [[r, int((pos[r] >= 0).sum()), pos.shape[1]] for r in padded.nonzero().flatten().tolist()]
    assert result.padding == want  # trailing padding: [row, first, stop)
    ds = load_from_disk(str(tmp_path / "cache")).with_format("torch")
    for r, first, stop in want:  # as stored: the pad id, zero activations
        assert torch.equal(ds[r]["token_ids"], run.tensor("h1", "input_ids")[r])
        assert not ds[r]["h1"][first:stop].any() and ds[r]["h1"][:first].any()
    assert json.loads((tmp_path / "cache/activault.json").read_text())["padding"] == want
    assert result.bytes_read == sum(
        run.tensor(h).numel() * run.tensor(h).element_size() + 8 * pos.numel() for h in ["h1"]
    )


def test_the_sidecar_says_where_the_cache_came_from(run: SynthRun, local: LocalStore, tmp_path: Path):
    result = export_saelens(str(local.root / "run"), ["h1", "h2"], tmp_path / "c", columns={"h1": "a"})
    sidecar = json.loads((tmp_path / "c" / "activault.json").read_text())
    assert sidecar == {
        "format": "activault-saelens-cache",
        "format_version": 1,
        "source": str(local.root / "run"),
        "columns": {"a": {"hook": "h1", "dtype": "bfloat16"}, "h2": {"hook": "h2", "dtype": "bfloat16"}},
        "rows": result.rows,
        "tokens": result.tokens,
        "positions": False,
        "padding_tokens": result.padding_tokens,
        "padding": result.padding,
        # A synthetic run written by RunWriter, as a collection's: documents never attend to each other.
        "provenance": {"packing": "isolated segments", "cross_document_attention": "none"},
    }
    assert set(load_from_disk(str(tmp_path / "c")).column_names) == {"a", "h2", "token_ids"}


def test_float16_on_request(run: SynthRun, local: LocalStore, tmp_path: Path):
    export_saelens(str(local.root / "run"), "h2", tmp_path / "c", dtype="float16")
    ds = load_from_disk(str(tmp_path / "c")).with_format("numpy")
    assert ds.features["h2"].dtype == "float16"
    assert np.array_equal(ds["h2"], expected(run, "h2").to(torch.float16).numpy())


def test_small_shards_give_several_arrow_files_with_the_same_rows(run: SynthRun, local: LocalStore, tmp_path: Path):
    whole = export_saelens(str(local.root / "run"), "h1", tmp_path / "one")
    split = export_saelens(str(local.root / "run"), "h1", tmp_path / "many", shard_bytes=1)
    assert whole.arrow_files == 1 and split.arrow_files == len(run.names)  # whole megabatches per file
    names = sorted(p.name for p in (tmp_path / "many").glob("*.arrow"))
    assert names == [f"data-{i:05d}-of-{split.arrow_files:05d}.arrow" for i in range(split.arrow_files)]
    a = load_from_disk(str(tmp_path / "one")).with_format("numpy")
    b = load_from_disk(str(tmp_path / "many")).with_format("numpy")
    assert np.array_equal(a["h1"], b["h1"]) and np.array_equal(a["token_ids"], b["token_ids"])


def test_an_existing_empty_folder_is_used(run: SynthRun, local: LocalStore, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    export_saelens(str(local.root / "run"), "h1", tmp_path / "empty")
    assert (tmp_path / "empty" / "state.json").is_file() and leftovers(tmp_path) == []


# ---- refused before anything is read or written ----


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"columns": {"h1": "token_ids"}}, "reserved ['token_ids']"),
        ({"columns": {"h1": "positions"}}, "reserved ['positions']"),
        ({"columns": {"h1": "x", "h2": "x"}}, "column names ['x', 'x'] repeat"),
        ({"columns": {"h1": "h2"}}, "repeat"),
        ({"dtype": "bfloat16"}, "dtype 'bfloat16' cannot be stored in Arrow; use float32 or float16"),
        ({"dtype": "int8"}, "dtype 'int8' cannot be stored in Arrow"),
        ({"dtype": "fp16"}, "dtype 'fp16' cannot be stored in Arrow"),
        ({"dtype": "x" * 5000}, "cannot be stored in Arrow"),
        ({"dtype": torch.int32}, "dtype torch.int32 cannot be stored in Arrow"),
    ],
)
def test_bad_arguments_are_one_config_error_and_leave_nothing(run, local, tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as e:
        export_saelens(str(local.root / "run"), ["h1", "h2"], tmp_path / "out", **kwargs)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("occupied", ["file", "non-empty folder"])
def test_an_occupied_destination_is_refused_and_kept(run, local, tmp_path, occupied):
    out = tmp_path / "out"
    if occupied == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        export_saelens(str(local.root / "run"), "h1", out)
    assert (out if occupied == "file" else out / "keep.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where,hooks", [("run", "nope"), ("no-such-run", "h1"), ("run", ["nope"])])
def test_a_run_or_hook_that_is_not_there_is_not_found(run, local, tmp_path, where, hooks):
    with pytest.raises(NotFoundError):
        export_saelens(str(local.root / where), hooks, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_damaged_file_fails_the_export_and_leaves_nothing(run: SynthRun, local: LocalStore, tmp_path: Path):
    victim = local.root / "run" / "h1" / run.names[-1]
    data = bytearray(victim.read_bytes())
    data[-10:] = b"\xff" * 10  # the end of the last tensor: found by its checksum or its decoding
    victim.write_bytes(bytes(data[:-4]))  # and the file is short
    with pytest.raises(FormatError):
        export_saelens(str(local.root / "run"), "h1", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---- against SAELens's own cache layout and trainer, and a truncated file


def test_export_has_saelens_layout_and_saelens_trains_from_it(tmp_path: Path) -> None:
    from sae_lens.training.activations_store import ActivationsStore

    g = torch.Generator().manual_seed(0)
    acts, ids = (
        torch.randn(6, 16, 8, generator=g),
        torch.randint(0, 900, (6, 16), generator=g, dtype=torch.int32),
    )
    ref = saelens_cache(tmp_path / "ref", "blocks.0.hook_resid_post", acts, ids)
    import_saelens(ref, str(tmp_path / "vault/run"))
    export_saelens(str(tmp_path / "vault/run"), "blocks.0.hook_resid_post", tmp_path / "ours")
    for name in ("dataset_info.json",):
        assert json.loads((ref / name).read_text()) == json.loads((tmp_path / "ours" / name).read_text())
    ref_state, our_state = (json.loads((p / "state.json").read_text()) for p in (ref, tmp_path / "ours"))
    assert ref_state.keys() == our_state.keys() and our_state["_fingerprint"]
    assert [f["filename"] for f in our_state["_data_files"]] == ["data-00000-of-00001.arrow"]
    import pyarrow as pa

    schemas = [
        pa.ipc.open_stream(
            pa.memory_map(str(p / "data-00000-of-00002.arrow" if p == ref else p / "data-00000-of-00001.arrow"))
        ).schema
        for p in (ref, tmp_path / "ours")
    ]
    assert schemas[0].equals(schemas[1], check_metadata=True)
    store = ActivationsStore(
        model=None,
        dataset=None,
        streaming=False,
        hook_name="blocks.0.hook_resid_post",  # type: ignore[arg-type]
        hook_head_index=None,
        context_size=16,
        d_in=8,
        n_batches_in_buffer=2,
        total_training_tokens=96,
        store_batch_size_prompts=3,
        train_batch_size_tokens=16,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=str(tmp_path / "ours"),
    )
    got, got_ids = store.get_raw_llm_batch()
    assert torch.equal(got, acts[:3].reshape(-1, 8)) and torch.equal(got_ids.int(), ids[:3].reshape(-1))


def test_export_is_atomic_when_a_file_is_damaged(run: SynthRun, tmp_path: Path) -> None:
    victim = tmp_path / "run/h2" / run.names[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        export_saelens(str(tmp_path / "run"), HOOKS, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".cache*"))


# ---- a link as destination; a killed export


@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_as_destination_is_refused_before_anything_is_read(
    run: SynthRun, local: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dangling: bool
):
    import activault

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run was opened")

    monkeypatch.setattr(activault, "RCache", no_reading)
    target = tmp_path / "elsewhere"
    if not dangling:
        target.mkdir()
    (tmp_path / "out").symlink_to(target)
    tail = f"pass the folder it points to ({target})" if not dangling else ", which does not exist): an export"
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'out'} is a symbolic link (to {target}")) as e:
        export_saelens(str(local.root / "run"), "h1", tmp_path / "out")
    assert tail in str(e.value) and "never follows a link" in str(e.value)
    assert os.readlink(tmp_path / "out") == str(target) and leftovers(tmp_path) == []
    assert dangling or list(target.iterdir()) == []


KILLED_EXPORT = """
    import sys
    from datasets.arrow_writer import ArrowWriter
    from activault.integrations.saelens_cache.exporter import export_saelens

    real, shards = ArrowWriter.finalize, []

    def finalize(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        shards.append(self)
        if len(shards) == 2:
            stop_here()  # two Arrow files written, the cache not finished
        return out

    ArrowWriter.finalize = finalize
    export_saelens(sys.argv[1], ["h1", "h2"], sys.argv[2], positions=True, shard_bytes=1, store_options=OPTIONS)
"""


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_a_killed_export_is_cleaned_up_by_the_rerun_and_the_same_bytes(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
):
    if where == "local":
        store: Store = LocalStore(tmp_path / "vault", fsync=False)
        options: dict[str, Any] | None = None
    else:
        env = s3_env(request.getfixturevalue("moto_url"))
        store, options = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=env), {"env": env}
    write_synthetic_run(store, "run", ["h1", "h2"], machines=2, files=2, dtype=torch.float32)
    uri, out = store.url("run"), tmp_path / "out" / "cache"
    code = KILLED_EXPORT.replace("sys.argv[1]", repr(uri)).replace("sys.argv[2]", repr(str(out)))

    def a_live_exports_folder_is_kept() -> None:
        (held,) = [p for p in out.parent.iterdir() if p.name.startswith(".cache.tmp-")]
        assert _clear_leftovers(out) == 0 and sorted(p.name for p in held.iterdir()) == [
            "part-00000.arrow",
            "part-00001.arrow",
        ]

    kill_when_reached(
        code.replace("OPTIONS", repr(options)), tmp_path / "reached", while_stopped=a_live_exports_folder_is_kept
    )
    assert len(leftovers(out.parent)) == 1 and not out.exists()  # what the killed export left
    export_saelens(uri, ["h1", "h2"], out, positions=True, shard_bytes=1, store_options=options)
    export_saelens(uri, ["h1", "h2"], tmp_path / "whole", positions=True, shard_bytes=1, store_options=options)
    assert leftovers(out.parent) == [] and leftovers(tmp_path) == []
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(files) == 2 + 4 + 1 and files == {p.name: p.read_bytes() for p in sorted((tmp_path / "whole").iterdir())}


def test_the_fingerprint_follows_the_content(run: SynthRun, local: LocalStore, tmp_path: Path):
    """datasets' own fingerprint hashes paths and times: two exports of the same rows would differ."""
    fingerprints = []
    for out, hook in (("a", "h1"), ("b", "h1"), ("c", "h2")):
        export_saelens(str(local.root / "run"), hook, tmp_path / out, columns={hook: "x"})
        fingerprints.append(json.loads((tmp_path / out / "state.json").read_text())["_fingerprint"])
    assert fingerprints[0] == fingerprints[1] != fingerprints[2] and len(fingerprints[0]) == 16
    assert (tmp_path / "a/data-00000-of-00001.arrow").read_bytes() == (
        tmp_path / "b/data-00000-of-00001.arrow"
    ).read_bytes()


def test_only_unheld_folders_named_as_an_exports_temp_folder_are_removed(tmp_path: Path):
    out = tmp_path / "cache"
    for name in (".cache.tmp-0123abcd", ".cache.tmp-zzzzzzzz", ".other.tmp-0123abcd", ".cache.tmp-0123abcd0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part-00000.arrow").write_bytes(b"x")
    (tmp_path / ".cache.tmp-4567abcd").write_text("a file, not an export's folder")
    (tmp_path / ".cache.tmp-89abcdef").symlink_to(tmp_path / ".other.tmp-0123abcd")
    assert _clear_leftovers(out) == 1
    assert leftovers(tmp_path) == [
        ".cache.tmp-0123abcd0",
        ".cache.tmp-4567abcd",
        ".cache.tmp-89abcdef",
        ".cache.tmp-zzzzzzzz",
        ".other.tmp-0123abcd",
    ]
    assert (tmp_path / ".other.tmp-0123abcd/part-00000.arrow").exists()  # never through the link


def test_a_destination_that_cannot_be_created_is_one_config_error(run: SynthRun, local: LocalStore, tmp_path: Path):
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(ConfigError, match=r"cannot create .*a-file/\.cache\.tmp-.*; choose a destination in a folder"):
        export_saelens(str(local.root / "run"), "h1", tmp_path / "a-file" / "cache")
    assert (tmp_path / "a-file").read_text() == "keep me"
