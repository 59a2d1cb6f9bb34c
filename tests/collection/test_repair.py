"""`collect --repair`: exactly the damaged or missing counted files collected again, byte for byte,
on the local store and on S3; intact files, records and statistics left as they were."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from activault.collection.packing import DataState
from activault.collection.pipeline import collect
from activault.collection.repair import Damage, check_data, check_tokens, file_batches, token_digest
from activault.errors import ConfigError, DataError, FormatError, LockedError
from activault.storage import LocalStore, Store
from activault.storage.lock import hold
from activault.storage.s3 import S3Store
from activault.vault import records
from support.collecting import CORPUS, make_cfg
from support.synth import s3_env

H0, H1 = "models.layers.1.post", "models.layers.0.mlp.post"  # make_cfg's hooks


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, monkeypatch) -> tuple[str, Store]:
    """A destination (what `storage` says) and the store over it, on the local store and on moto."""
    if request.param == "local":
        return str(tmp_path / "vault"), LocalStore(tmp_path / "vault")
    url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
    for k, v in s3_env(url).items():
        monkeypatch.setenv(k, v)
    return f"s3://{bucket}/v", S3Store(f"s3://{bucket}/v", env=s3_env(url))


def objects(store: Store) -> dict[str, bytes]:
    """Every object of the run but the lock."""
    return {e.key: bytes(store.get(e.key)) for e in store.list("run") if "/.locks/" not in e.key}


@pytest.fixture
def puts(monkeypatch) -> list[str]:
    """The keys written (put or swap) from now on, on any store, but the machine's lease."""
    seen: list[str] = []
    for cls in (LocalStore, S3Store):
        for name in ("put", "swap"):
            real = getattr(cls, name)

            def spy(self, key, *a, _real=real, **k):
                if "/.locks/" not in key:
                    seen.append(key)
                return _real(self, key, *a, **k)

            monkeypatch.setattr(cls, name, spy)
    return seen


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Rows of every forward pass the collection runs (not the skeleton's)."""
    from activault.collection import hooks

    rows: list[int] = []

    class Counted(hooks.Capture):
        def __call__(self, input_ids, *args, **kwargs):
            if input_ids.device.type != "meta":
                rows.append(input_ids.shape[0])
            return super().__call__(input_ids, *args, **kwargs)

    monkeypatch.setattr(hooks, "Capture", Counted)
    return rows


def stat_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.safetensors")}


def test_repair_collects_exactly_the_damaged_files_again(llama, where, puts, forwards, caplog):
    dest, store = where
    cfg = make_cfg(llama, dest)
    collect(cfg, show_progress=False)
    before = objects(store)
    flipped, deleted = f"run/{H0}/m00000-000001.safetensors", f"run/{H1}/m00000-000002.safetensors"
    data = bytearray(before[flipped])
    data[-5] ^= 0x40  # one bit of the last state
    store.put(flipped, bytes(data))
    store.delete(deleted)
    local = stat_of(Path(dest) / "run") if isinstance(store, LocalStore) else {}
    puts.clear()
    forwards.clear()

    with caplog.at_level(logging.INFO, logger="activault"):
        result = collect(cfg, show_progress=False, repair=True)

    assert objects(store) == before  # every file and record byte for byte
    assert sorted(puts) == sorted([flipped, deleted]), "nothing else written: no record, no intact file"
    assert result.repaired == [1, 2]
    assert sum(forwards) == 2 * cfg.rows_per_file, "the model ran only over files 1 and 2, not file 0"
    assert "2 damaged or missing copies in 2 of 3 counted files" in caplog.text
    if local:
        now = stat_of(Path(dest) / "run")
        intact = set(local) - {flipped.removeprefix("run/")}
        assert {k: now[k] for k in intact} == {k: local[k] for k in intact}  # same inode and mtime


@pytest.mark.parametrize("damage", ["zero-bytes", "truncated", "header"])
def test_every_kind_of_damage_is_found(llama, tmp_path, damage):
    cfg = make_cfg(llama, tmp_path, data={"n_batches": 4})
    collect(cfg, show_progress=False)
    path = tmp_path / "run" / H1 / "m00000-000000.safetensors"
    want = path.read_bytes()
    cut = {"zero-bytes": b"", "truncated": want[: len(want) // 2], "header": want[:9] + b"X" + want[10:]}
    path.write_bytes(cut[damage])
    assert collect(cfg, show_progress=False, repair=True).repaired == [0]
    assert path.read_bytes() == want


def test_repair_of_a_healthy_run_does_nothing_and_says_so(llama, tmp_path, puts, forwards, caplog):
    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    before = stat_of(tmp_path / "run")
    puts.clear()
    forwards.clear()
    with caplog.at_level(logging.INFO, logger="activault"):
        result = collect(cfg, show_progress=False, repair=True)
    assert result.repaired == [] and puts == [] and forwards == []
    assert "nothing to repair: all 3 counted files are intact in every hook" in caplog.text
    assert stat_of(tmp_path / "run") == before


def test_repair_does_not_count_tokens_twice(llama, tmp_path):
    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    records = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.json")}
    (tmp_path / "run" / H0 / "m00000-000000.safetensors").unlink()
    collect(cfg, show_progress=False, repair=True)
    assert {p: p.read_bytes() for p in records} == records  # progress and statistics.json as they were
    collect(cfg, show_progress=False)  # the machine is finished: a rerun merges statistics again
    assert {p: p.read_bytes() for p in records} == records


def test_repair_with_another_config_is_refused(llama, tmp_path):
    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    (tmp_path / "run" / H0 / "m00000-000001.safetensors").unlink()
    other = make_cfg(
        llama, tmp_path, transformer_config={"model_name": str(llama), "dtype": "bfloat16", "device": "cpu"}
    )
    with pytest.raises(ConfigError, match="transformer_config.dtype: stored 'float32', this config 'bfloat16'"):
        collect(other, show_progress=False, repair=True)
    assert not (tmp_path / "run" / H0 / "m00000-000001.safetensors").exists(), "nothing written"


def test_repair_waits_for_no_running_collector(llama, tmp_path):
    """The machine's claim is held by another collector: repair refuses and writes nothing."""
    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    (tmp_path / "run" / H0 / "m00000-000001.safetensors").unlink()
    with hold(LocalStore(tmp_path), "run", 0), pytest.raises(LockedError, match="run 'run' machine 0"):
        collect(cfg, show_progress=False, repair=True)
    assert not (tmp_path / "run" / H0 / "m00000-000001.safetensors").exists()


def test_data_changed_since_collection_is_refused_before_writing(llama, tmp_path):
    """The corpus was edited in place (same path, so cfg.json cannot tell): the files packed again
    hold other tokens, and repair stops before writing them under the old names."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(Path(CORPUS).read_bytes())
    cfg = make_cfg(llama, tmp_path / "vault", data={"data_key": str(corpus)})
    collect(cfg, show_progress=False)
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text(json.dumps({"text": "another document altogether " * 40}) + "\n" + "".join(lines[1:]))
    damaged = tmp_path / "vault/run" / H0 / "m00000-000002.safetensors"
    damaged.unlink()
    with pytest.raises(DataError, match=r"file 0 packed again holds other tokens .* Nothing was written"):
        collect(cfg, show_progress=False, repair=True)
    assert not damaged.exists()


# ---- the pure parts ----


def fake(rows: int) -> SimpleNamespace:
    return SimpleNamespace(input_ids=torch.zeros(rows, 3))


def test_file_batches_group_as_the_collection_did():
    groups = list(file_batches(iter([fake(2)] * 5), last=9, batches_per_upload=2, n_batches=5, rows_per_file=4))
    assert [(k, len(g)) for k, g in groups] == [(0, 2), (1, 2), (2, 1)]  # n_batches ends the last file
    short = [fake(2), fake(2), fake(2), fake(1), fake(2)]  # the data ran out in file 1
    assert [k for k, _ in file_batches(iter(short), 5, 2, 10, 4)] == [0, 1]
    assert [k for k, _ in file_batches(iter([fake(2)] * 8), 1, 2, 8, 4)] == [0, 1]  # stops after `last`


def test_check_tokens_refuses_other_tokens_only():
    damage = Damage(files=2, tokens={0: b"a"})
    check_tokens(damage, 0, b"a", "here")
    check_tokens(damage, 1, b"b", "here")  # no intact copy to compare with
    with pytest.raises(DataError, match="here: file 0 packed again holds other tokens"):
        check_tokens(damage, 0, b"b", "here")


def packed(state: DataState) -> SimpleNamespace:
    """A batch of one row of 3 stored tokens (one more forwarded, cleaned) and the cursor after it."""
    keep = torch.tensor([[True, False, True, True]])
    return SimpleNamespace(
        input_ids=torch.tensor([[5, 1, 6, 7]]), keep=keep, doc_positions=torch.tensor([[0, 1, 2, 3]]), state=state
    )


def test_check_data_refuses_data_ending_elsewhere_than_the_record():
    after = DataState(docs_done=1)
    ids, pos = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 2, 3]])
    damage = Damage(files=1, tokens={0: token_digest(ids, pos)})
    check_data(iter([(0, [packed(after)])]), damage, after.to_dict(), 3, "here")
    with pytest.raises(DataError, match=r"here: the data packed again ends elsewhere .*\(after 1 of its 1 files"):
        check_data(iter([(0, [packed(after)])]), damage, DataState(docs_done=2).to_dict(), 3, "here")
    with pytest.raises(DataError, match="after 1 of its 2 files"):  # the data ran out first
        check_data(iter([(0, [packed(after)])]), Damage(files=2), after.to_dict(), 3, "here")
    with pytest.raises(DataError, match="here: file 0 packed again holds other tokens"):
        check_data(iter([(0, [packed(after)])]), Damage(files=1, tokens={0: b"x"}), after.to_dict(), 3, "here")


def test_a_recompressed_run_is_repaired_in_the_codec_it_now_holds(llama, tmp_path, caplog):
    """cfg.json keeps the config's codec, metadata.json says how new files are stored: a repaired
    (or resumed) run follows metadata.json, so it stays one codec."""
    from activault.tools.recompress import recompress_run
    from activault.vault import codec as codecs

    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    store = LocalStore(tmp_path)
    recompress_run(store, "run", codecs.Codec("zstd"))
    before = objects(store)
    lost = f"run/{H1}/m00000-000001.safetensors"
    store.delete(lost)

    with caplog.at_level(logging.INFO, logger="activault"):
        assert collect(cfg, show_progress=False, repair=True).repaired == [1]

    assert objects(store) == before  # zstd, byte for byte as recompress wrote it, not raw
    assert "stores new files as zstd (its metadata.json" in caplog.text


def test_hooks_recording_different_codecs_are_refused_before_anything_is_written(llama, tmp_path):
    from activault.vault import codec as codecs
    from activault.vault.writer import record_compression

    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    store = LocalStore(tmp_path)
    record_compression(store, f"run/{H0}", codecs.Codec("zstd"))  # a recompress stopped after one hook
    store.delete(f"run/{H1}/m00000-000001.safetensors")
    before = objects(store)
    for repair in (True, False):
        with pytest.raises(ConfigError, match="different codecs") as e:
            collect(cfg, show_progress=False, repair=repair)
        assert f"{H0}: zstd" in str(e.value) and f"{H1}: none" in str(e.value)
        assert "activault recompress" in str(e.value) and "fp8 is lossy" in str(e.value)
        assert objects(store) == before


@pytest.mark.parametrize(
    "compression",
    [{"codec": "evil"}, {"codec": "zstd", "level": 99}, {"codec": "zstd", "chunk_bytes": -1}, "zstd", None],
)
def test_a_garbage_codec_in_metadata_json_is_damage_the_collection_rebuilds(llama, tmp_path, compression, caplog):
    cfg = make_cfg(llama, tmp_path)
    collect(cfg, show_progress=False)
    path = tmp_path / "run" / H0 / "metadata.json"
    want = path.read_bytes()
    meta = json.loads(want)
    meta["compression"] = compression
    path.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"metadata.json: .*'compression'.*rebuilds"):
        records.read_metadata(LocalStore(tmp_path), f"run/{H0}")  # the schema refuses it: damaged
    with caplog.at_level(logging.WARNING, logger="activault"):
        assert collect(cfg, show_progress=False, repair=True).repaired == []
    assert path.read_bytes() == want and "metadata.json was damaged" in caplog.text


def test_a_new_zstd_level_applies_to_new_files_of_a_zstd_run(llama, tmp_path):
    """Level and chunk size are runtime settings: new files of a zstd run take the config's level
    (only the codec itself follows metadata.json)."""
    from activault.vault import megabatch as fmt

    cfg = make_cfg(llama, tmp_path, upload={"compression": "zstd"})
    collect(cfg, show_progress=False)
    path = tmp_path / "run" / H0 / "m00000-000001.safetensors"
    path.unlink()
    collect(make_cfg(llama, tmp_path, upload={"compression": "zstd", "compression_level": 3}), repair=True)
    levels = {
        p.name: fmt.parse_header(p.read_bytes(), str(p)).packed["states"].level
        for p in path.parent.glob("*.safetensors")
    }
    assert levels == {"m00000-000000.safetensors": 1, "m00000-000001.safetensors": 3, "m00000-000002.safetensors": 1}
