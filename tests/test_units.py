"""Unit tests of the pieces under everything: the file format, the local store, the statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from activault.errors import FormatError, NotFoundError, StorageError
from activault.storage import LocalStore, open_store
from activault.vault.megabatch import decode, encode, file_name, parse_file_name
from activault.vault.stats import RunningStats, merge_all


def megabatch(dtype=torch.bfloat16, rows=3, seq=5, d=4):
    g = torch.Generator().manual_seed(0)
    return {
        "states": torch.randn(rows, seq, d, generator=g).to(dtype),
        "input_ids": torch.randint(0, 1000, (rows, seq), generator=g, dtype=torch.int32),
        "positions": torch.arange(seq, dtype=torch.int32).repeat(rows, 1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_format_round_trip_and_safetensors_compatibility(tmp_path, dtype):
    tensors = megabatch(dtype)
    parts = encode(tensors, {"hook": "h", "file_index": "7"})
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"".join(parts))
    got, meta = decode(path.read_bytes(), "f.safetensors")
    assert meta == {"hook": "h", "file_index": "7"}
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    with safe_open(str(path), "pt") as f:  # the reference implementation reads our files
        assert f.metadata() == meta
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)


def test_encode_does_not_copy_the_states():
    tensors = megabatch(torch.float32)
    parts = encode(tensors, {})
    states_part = next(p for p in parts if p.nbytes == tensors["states"].numel() * 4)
    tensors["states"][0, 0, 0] = 42.0  # the buffer handed to the writer is the tensor's own memory
    assert np.frombuffer(states_part, dtype=np.float32)[0] == 42.0


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[:5], "truncated file"),
        (lambda b: b[:-7], "truncated file"),
        (lambda b: b + b"extra", "unexpected bytes"),
        (lambda b: b[:8] + b"{not json" + b[17:], "corrupted header"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "corrupted or truncated header"),
    ],
)
def test_damaged_files_raise_naming_the_file(damage, message):
    blob = b"".join(encode(megabatch(), {}))
    with pytest.raises(FormatError, match=f"m00001-000002.safetensors: .*{message}"):
        decode(damage(blob), "m00001-000002.safetensors")


def test_file_names_sort_by_machine_then_index_and_parse_back():
    names = [file_name(m, k) for m in (0, 1, 12) for k in (0, 1, 100)]
    assert names == sorted(names)
    assert [parse_file_name(n) for n in names] == [(m, k) for m in (0, 1, 12) for k in (0, 1, 100)]
    assert parse_file_name("statistics.json") is None and parse_file_name("abc--1.pt") is None


def test_local_store_put_is_atomic_and_listings_hide_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.put("run/h/a.bin", [b"ab", memoryview(b"cd")])
    (tmp_path / "run/h/.b.bin.1234.tmp").write_bytes(b"half")  # what a killed writer leaves
    assert bytes(store.get("run/h/a.bin")) == b"abcd"
    assert bytes(store.get_range("run/h/a.bin", 1, 3)) == b"bc"
    assert [e.key for e in store.list("run")] == ["run/h/a.bin"]
    assert store.list_dir("run") == (["h"], [])
    assert store.size("run/h/a.bin") == 4 and store.size("run/h/none") is None
    assert store.clear_partial("run/h", "b") == 1 and not (tmp_path / "run/h/.b.bin.1234.tmp").exists()
    store.delete("run/h/a.bin")
    assert not (tmp_path / "run").exists()  # emptied folders go too
    with pytest.raises(NotFoundError, match="does not exist"):
        store.get("run/h/a.bin")
    with pytest.raises(StorageError, match="escapes the store root"):
        store.put("../outside", b"x")


def test_local_store_write_error_names_the_fix(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "x").mkdir()  # the name is taken by a folder: the rename fails, as a full disk would
    with pytest.raises(StorageError, match="cannot write .*run the same command again to resume"):
        store.put("x", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp file left behind


def test_open_store_by_uri(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store("s3://bucket/some/prefix").url("k") == "s3://bucket/some/prefix/k"


def test_statistics_merge_in_any_split_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(5000, 16)) * rng.uniform(0.1, 10, size=16)
    cuts = sorted(rng.choice(np.arange(1, 5000), size=9, replace=False))
    parts = []
    for a, b in zip([0, *cuts], [*cuts, 5000], strict=True):
        s = RunningStats(16)
        for chunk in np.array_split(x[a:b], 3):
            s.update(torch.from_numpy(chunk))
        parts.append(RunningStats.from_dict(json.loads(json.dumps(s.to_dict()))))  # through JSON, as on disk
    total = merge_all(parts)
    assert total is not None and total.count == 5000
    np.testing.assert_allclose(total.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.std.numpy(), x.std(0), rtol=1e-10)
    np.testing.assert_allclose(total.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-12)


def test_statistics_keep_the_within_batch_variance():
    # Two batches with equal means: a running std that forgot the within-batch term would say 0.
    s = RunningStats(1)
    s.update(torch.tensor([[-1.0], [1.0]]))
    s.update(torch.tensor([[-1.0], [1.0]]))
    assert float(s.std[0]) == pytest.approx(1.0)
