"""integrations/saelens_cache/exporter.py: a run's hooks as a SAELens activation cache, read back here
with `datasets` itself: the same states (bfloat16 exactly as float32), ids and positions, padding rows
dropped and counted, the sidecar, and atomic: a refused or failed export leaves nothing. Its layout is
the one SAELens writes, and SAELens's ActivationsStore trains from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.integrations.saelens_cache.exporter import export_saelens
from activault.integrations.saelens_cache.importer import import_saelens
from activault.storage import LocalStore
from support.integrations import HOOKS, saelens_cache
from support.synth import SynthRun

COLUMNS = {"h1": "blocks.0.hook_resid_post", "h2": "blocks.0.hook_mlp_out"}


def expected(run: SynthRun, hook: str, key: str = "states") -> torch.Tensor:
    """`key` of the rows an export keeps: rows holding padding (position -1) are dropped."""
    keep = (run.tensor(hook, "positions") >= 0).all(dim=1)
    return run.tensor(hook, key)[keep]


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


def test_padding_rows_are_dropped_and_counted(run: SynthRun, local: LocalStore, tmp_path: Path):
    result = export_saelens(str(local.root / "run"), "h1", tmp_path / "cache")
    pos = run.tensor("h1", "positions")
    padded = ~(pos >= 0).all(dim=1)
    assert result.padding_rows_dropped == int(padded.sum()) == 2, "one row per machine's last file"
    assert result.real_tokens_dropped == int((pos[padded] >= 0).sum())
    assert result.rows == pos.shape[0] - 2
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
        "padding_rows_dropped": result.padding_rows_dropped,
        "real_tokens_dropped": result.real_tokens_dropped,
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
