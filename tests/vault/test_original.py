"""The original Activault's records: read as it writes them, damage named without advising `collect`,
never written back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from activault.errors import ConfigError, FormatError
from activault.storage import LocalStore
from activault.vault import original as orig
from activault.vault import records
from activault.vault.megabatch import decode
from activault.vault.original import OriginalConfig, OriginalMetadata, OriginalStatistics
from support.original import OriginalVault, write_original_vault

HOOKS = ["models.layers.24.mlp.post", "models.layers.36.mlp.post"]
META = f"run/{HOOKS[0]}/metadata.json"


@pytest.fixture
def vault(local: LocalStore) -> OriginalVault:
    return write_original_vault(local, "run", HOOKS, files=2, batch_size=2, batches_per_file=3, seq=8, d=16)


def advice(e: pytest.ExceptionInfo[Exception], local: LocalStore) -> str:
    """The message without the vault's path (a test's folder name could hold any word)."""
    return str(e.value).replace(str(local.root), "VAULT")


def edit(local: LocalStore, key: str, **change: object) -> None:
    obj = json.loads(local.get_text(key))
    obj.update(change)
    local.put_text(key, json.dumps(obj))


def test_the_helper_lays_a_vault_out_as_the_original_does(local: LocalStore, vault: OriginalVault, tmp_path: Path):
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["cfg.json", *HOOKS]
    for h in HOOKS:
        names = sorted(p.name for p in (run / h).iterdir())
        assert names == sorted(["metadata.json", "statistics.json", *vault.names])
    uuid_part, _, rest = vault.names[0].partition("--")
    assert len(uuid_part) == 36 and rest.endswith("_0.saved.pt")
    meta = json.loads((run / HOOKS[0] / "metadata.json").read_text())
    assert meta["dtype"] == "torch.float16" and "format" not in meta
    assert meta["shape"] == [6, 8, 16] and meta["input_ids_shape"] == [6, 8] and meta["batches_per_file"] == 3
    assert set(json.loads((run / HOOKS[0] / "statistics.json").read_text())) == {"mean", "std", "norm", "M2"}
    # Its files load without running pickled code, and hold what it saved.
    mb = decode(local.get(f"run/{HOOKS[1]}/{vault.names[1]}"), f"run/{HOOKS[1]}/{vault.names[1]}")
    assert mb.header is None and mb.positions is None
    assert torch.equal(mb.states, vault.files[HOOKS[1]][vault.names[1]]["states"])
    assert mb.input_ids.dtype == torch.int64


def test_metadata_reads_as_what_the_files_hold(local: LocalStore, vault: OriginalVault):
    meta = records.read_metadata(local, f"run/{HOOKS[0]}")
    assert meta is not None and isinstance(meta.original, OriginalMetadata)
    assert (meta.rows_per_file, meta.seq_length, meta.d_model, meta.dtype) == (6, 8, 16, "float16")
    assert (meta.batch_size, meta.batches_per_upload) == (2, 3)
    assert meta.bytes_per_file == local.size(f"run/{HOOKS[0]}/{vault.names[0]}")
    # Written from one batch, before any upload (no bytes_per_file): a file is batches_per_file of those.
    edit(local, META, batch_size=2, shape=[2, 8, 16], input_ids_shape=[2, 8], bytes_per_file=None)
    obj = json.loads(local.get_text(META))
    del obj["bytes_per_file"]
    local.put_text(META, json.dumps(obj))
    meta = records.read_metadata(local, f"run/{HOOKS[0]}")
    assert meta is not None and (meta.rows_per_file, meta.batch_size, meta.batches_per_upload) == (6, 2, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shape": [6, 8, 32]}, "shape [6, 8, 32] is not [batch_size, sequence_length, d_in]"),
        ({"input_ids_shape": [6, 9]}, "input_ids_shape [6, 9] is not [batch_size, sequence_length]"),
        ({"dtype": "torch.float8"}, "dtype 'torch.float8' is not one activations are stored in"),
        ({"dtype": "torch.int64"}, "dtype 'torch.int64' is not one"),
        ({"d_in": -16, "shape": [6, 8, -16]}, "field 'd_in': Input should be greater than 0"),
        ({"batch_size": -6}, "field 'batch_size': Input should be greater than 0"),
        ({"batches_per_file": 0}, "field 'batches_per_file'"),
        ({"sequence_length": 10**9}, "field 'sequence_length': Input should be less than or equal to"),
        ({"bytes_per_file": -1}, "field 'bytes_per_file'"),
        ({"d_in": "16"}, "field 'd_in': Input should be a valid integer"),
        ({"shape": None}, "field 'shape'"),
    ],
)
def test_damaged_metadata_is_one_format_error_that_never_advises_collect(
    local: LocalStore, vault: OriginalVault, change: dict[str, object], message: str
):
    edit(local, META, **change)
    with pytest.raises(FormatError) as e:
        records.read_metadata(local, f"run/{HOOKS[0]}")
    text = advice(e, local)
    assert str(e.value).startswith(local.url(META)) and message in text
    assert "collect" not in text and "original Activault" in text and "restore" in text


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_metadata_that_is_not_json_is_named_as_the_originals(local: LocalStore, vault: OriginalVault, raw: bytes):
    local.put(META, raw)
    with pytest.raises(FormatError) as e:
        records.read_metadata(local, f"run/{HOOKS[0]}")
    assert local.url(META) in str(e.value) and "collect" not in advice(e, local)
    assert "original Activault" in advice(e, local)


def test_statistics_are_never_read_as_exact(local: LocalStore, vault: OriginalVault):
    folder = f"run/{HOOKS[0]}"
    with pytest.raises(FormatError, match="not exact: they cover machine 0's tokens only") as e:
        records.read_statistics(local, folder)
    assert "collect" not in advice(e, local)
    stats = records.read_original_statistics(local, folder)
    assert isinstance(stats, OriginalStatistics) and len(stats.mean) == 16 and stats.M2 is not None
    states = vault.tensor(HOOKS[0]).float().reshape(-1, 16)
    assert torch.allclose(torch.tensor(stats.mean), states.mean(0), atol=1e-4)
    # The original's std leaves out the spread within batches: far below the tokens' std.
    assert float(torch.tensor(stats.std).mean()) < 0.5 * float(states.std(0, correction=0).mean())
    edit(local, f"{folder}/statistics.json", std=[-1.0] * 16)
    with pytest.raises(FormatError, match="a std or norm is negative") as e:
        records.read_original_statistics(local, folder)
    assert "collect" not in advice(e, local)
    local.put_text(f"{folder}/statistics.json", "nan(")
    with pytest.raises(FormatError, match="not valid JSON") as e:
        records.read_statistics(local, folder)
    assert "collect" not in advice(e, local) and "original Activault" in str(e.value)


def test_cfg_is_read_only_when_asked_and_never_written(local: LocalStore, vault: OriginalVault):
    with pytest.raises(ConfigError, match="never writes into") as e:
        records.read_run(local, "run")  # what collect, import, recompress and merge-stats call
    assert "into a run of its own" in advice(e, local) and "rerun" not in advice(e, local)
    rec = records.read_run(local, "run", original_ok=True)
    assert rec is not None and isinstance(rec.original, OriginalConfig)
    assert rec.hooks == HOOKS and rec.num_runs == 1 and rec.tokenizer == "meta-llama/Llama-3.3-70B-Instruct"
    meta = records.read_metadata(local, f"run/{HOOKS[0]}")
    for key, record in [("run/cfg.json", rec), (META, meta)]:
        before = local.get_text(key)
        with pytest.raises(ConfigError, match="original Activault"):
            records.write_record(local, key, record)  # type: ignore[arg-type]
        assert local.get_text(key) == before
    edit(local, "run/cfg.json", num_runs=0)
    with pytest.raises(FormatError, match="field 'num_runs'") as e:
        records.read_run(local, "run", original_ok=True)
    assert "collect" not in advice(e, local) and "original Activault" in str(e.value)


def test_commands_that_write_refuse_an_original_vault(local: LocalStore, vault: OriginalVault, capsys, tmp_path):
    from support.collecting import run_cli

    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args in (
        ["merge-stats", str(tmp_path / "run")],
        ["recompress", str(tmp_path / "run"), "--compression", "zstd"],
    ):
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and "original Activault" in err and "never writes into" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_recognised_by_their_fields():
    assert orig.is_metadata({"d_in": 1}) and not orig.is_metadata({"d_in": 1, "format": "activault"})
    assert not orig.is_metadata({"d_model": 8, "seq_length": 4})
    assert orig.is_statistics({"mean": [0.0], "std": [1.0]}) and orig.is_statistics({"M2": []})
    assert not orig.is_statistics({"mean": [0.0], "count": 3, "d_model": 1})
    assert orig.is_config({"run_name": "r", "transformer_config": {}})
    assert not orig.is_config({"format": "activault", "config": {"transformer_config": {}}})


def test_a_writer_never_rewrites_an_original_vaults_metadata(local: LocalStore, vault: OriginalVault) -> None:
    """Even with cfg.json gone, a writer of the same run name stops at the original's metadata.json."""
    from activault.vault.runs import rebuild_metadata

    local.delete("run/cfg.json")
    before = local.get_text(META)
    spec = records.HookMetadata(
        run_name="run",
        hook=HOOKS[0],
        shape=[6, 8, 16],
        dtype="float16",
        d_model=16,
        seq_length=8,
        batch_size=2,
        batches_per_upload=3,
        rows_per_file=6,
        bytes_per_file=6 * 8 * (16 * 2 + 8),
    )
    with pytest.raises(ConfigError, match="original Activault.*never writes into it; choose a new run_name"):
        rebuild_metadata(local, "run", {HOOKS[0]: spec}, 0, 0)  # a new machine: files_done 0
    assert local.get_text(META) == before
