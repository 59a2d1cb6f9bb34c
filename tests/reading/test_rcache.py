"""RCache (and TokenLoader alongside it) against synthetic runs (local folders and a moto S3 server)."""

from __future__ import annotations

import gc
import json
import os
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from activault.errors import ConfigError, FormatError, NotFoundError
from activault.reading import buffers, fetch
from activault.reading.dataset import ActivationDataset
from activault.reading.rcache import RCache, S3RCache
from activault.reading.tokens import TokenLoader
from activault.storage import LocalStore
from activault.storage.s3 import S3Store
from activault.vault import megabatch as fmt
from activault.vault import records
from support.original import OriginalVault, write_original_vault
from support.synth import (
    SynthRun,
    create_bucket,
    make_public,
    s3_env,
    write_synthetic_run,
)


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files here are a few KiB: ranges of 256 B to 1 KiB exercise the parallel ranged reads.
    monkeypatch.setattr(fetch, "RANGE_SIZE", 1024)
    monkeypatch.setattr(fetch, "MIN_RANGE", 256)


def rows(t: torch.Tensor) -> Counter[bytes]:
    """Multiset of the rows of `t: [n, ...]`, as bytes."""
    flat = t.reshape(t.shape[0], -1).contiguous()
    return Counter(bytes(r.view(torch.uint8).numpy()) for r in flat)


def tokens(run: SynthRun, hook: str, names: list[str] | None = None) -> Counter[bytes]:
    """Multiset of (state, input_id, position) of every non-padding token."""
    s, i, p = (run.tensor(hook, k, names) for k in ("states", "input_ids", "positions"))
    keep = p.reshape(-1) >= 0
    return triples(s.reshape(-1, s.shape[-1])[keep], i.reshape(-1)[keep], p.reshape(-1)[keep])


def triples(s: torch.Tensor, i: torch.Tensor, p: torch.Tensor) -> Counter[bytes]:
    both = torch.cat(
        [
            s.reshape(s.shape[0], -1).view(torch.uint8),
            i.to(torch.int64).view(-1, 1).view(torch.uint8),
            p.to(torch.int32).view(-1, 1).view(torch.uint8),
        ],
        1,
    )
    return rows(both)


def active_threads() -> list[str]:
    """The readers' threads (not vault/codec.py's decode pool: process-wide, it outlives readers)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("activault") and "codec" not in t.name]


def test_round_trip(run: SynthRun, tmp_path: Path, small_ranges: None) -> None:
    with RCache(tmp_path / "run/h1", return_ids=True) as cache:
        out = list(cache)
    assert len(out) == len(run.names) == 6
    for name, b in zip(run.names, out, strict=True):
        assert torch.equal(b["states"], run.files["h1"][name]["states"])
        assert b["input_ids"].dtype == torch.int64 and b["positions"].dtype == torch.int32
        assert torch.equal(b["input_ids"], run.files["h1"][name]["input_ids"].long())
        assert torch.equal(b["positions"], run.files["h1"][name]["positions"])
    states = torch.cat(list(RCache(str(tmp_path / "run/h2"))))
    assert torch.equal(states, run.tensor("h2"))


def test_shuffle_keeps_ids_and_positions_with_states(run: SynthRun, tmp_path: Path) -> None:
    cache = RCache(tmp_path / "run/h1", return_ids=True, shuffle=True, preserve_file_order=False, seed=3)
    out = list(cache)
    assert [b["states"].shape for b in out] == [(4, 16, 8)] * 6
    assert not torch.equal(torch.cat([b["states"] for b in out]), run.tensor("h1"))
    got = sum(
        (triples(b["states"].reshape(-1, 8), b["input_ids"].reshape(-1), b["positions"].reshape(-1)) for b in out),
        Counter(),
    )
    s, i, p = (run.tensor("h1", k) for k in ("states", "input_ids", "positions"))
    assert got == triples(s.reshape(-1, 8), i.reshape(-1), p.reshape(-1))
    again = list(RCache(tmp_path / "run/h1", return_ids=True, shuffle=True, preserve_file_order=False, seed=3))
    assert all(torch.equal(a["states"], b["states"]) for a, b in zip(out, again, strict=True))


def test_several_prefixes_and_incompatible(local: LocalStore, tmp_path: Path) -> None:
    a = write_synthetic_run(local, "a", ["h"], files=2, seed=1)
    b = write_synthetic_run(local, "b", ["h"], files=3, seed=2)
    out = torch.cat(list(RCache([tmp_path / "a/h", tmp_path / "b/h"])))
    assert torch.equal(out, torch.cat([a.tensor("h"), b.tensor("h")]))
    write_synthetic_run(local, "c", ["h"], files=1, d=16)
    with pytest.raises(ConfigError, match="d_model=16") as e:
        RCache([tmp_path / "a/h", tmp_path / "c/h"])
    assert "a/h" in str(e.value) and "c/h" in str(e.value)


def test_resume_rcache(run: SynthRun, tmp_path: Path) -> None:
    opts = dict(return_ids=True, shuffle=True, preserve_file_order=False, seed=5)
    full = [b["states"] for b in RCache(tmp_path / "run/h1", **opts)]
    cache = RCache(tmp_path / "run/h1", **opts)
    for k, _ in enumerate(cache):
        if k == 1:
            break
    state = cache.state_dict()
    assert cache.current_file_index == 2
    cache.finalize()
    again = RCache(tmp_path / "run/h1", **opts)
    again.load_state_dict(state)
    rest = [b["states"] for b in again]
    assert len(rest) == 4 and all(torch.equal(x, y) for x, y in zip(rest, full[2:], strict=True))
    third = RCache(tmp_path / "run/h1", **opts)
    third.set_file_index(5)
    assert torch.equal(next(iter(third))["states"], full[5])
    third.finalize()
    # A finished epoch starts the next one, in a new order.
    assert again.epoch == 1 and again.current_file_index == 0


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"file_index": -3}, "field 'file_index' is -3, not a whole number 0..6"),  # was: accepted
        ({"file_index": 7}, "field 'file_index' is 7, not a whole number 0..6"),
        ({"epoch": -1}, "field 'epoch' is -1, not a whole number >= 0"),  # was: accepted
        ({"epoch": 1.5}, "field 'epoch' is 1.5"),  # was: int() made it 1
        ({"epoch": "2"}, "field 'epoch' is '2'"),
        ({"file_index": True}, "field 'file_index' is True"),
        ({"epoch": None}, "field 'epoch' is None"),
    ],
)
def test_a_tampered_rcache_state_is_one_error_naming_the_field(
    run: SynthRun, tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    cache = RCache(tmp_path / "run/h1")
    state = cache.state_dict()
    with pytest.raises(ConfigError) as e:
        cache.load_state_dict({**state, **change})
    assert str(e.value).startswith("RCache state: ") and problem in str(e.value), str(e.value)
    for bad, why in (([1], "a list, not a mapping"), ({"epoch": 0}, "no file_index, seed, rank, world_size")):
        with pytest.raises(ConfigError, match=why):  # was: KeyError, TypeError
            cache.load_state_dict(bad)  # type: ignore[arg-type]
    assert cache.state_dict() == state  # nothing changed by a refused state
    cache.finalize()


def test_ddp_shards_are_disjoint_and_cover(run: SynthRun, tmp_path: Path) -> None:
    names_by_first_row = {bytes(run.files["h1"][n]["states"][0, 0].view(torch.uint8).numpy()): n for n in run.names}
    seen: list[str] = []
    for rank in range(4):
        for b in RCache(tmp_path / "run/h1", rank=rank, world_size=4, preserve_file_order=False, seed=1):
            seen.append(names_by_first_row[bytes(b[0, 0].view(torch.uint8).numpy())])
    assert sorted(seen) == run.names
    got: Counter[bytes] = Counter()
    for rank in range(3):
        for b in TokenLoader(
            tmp_path / "run/h1", batch_tokens=16, window=1, rank=rank, world_size=3, drop_last=False, return_ids=True
        ):
            got += triples(b["states"], b["input_ids"], b["positions"])
    assert got == tokens(run, "h1")


def test_aligned_hooks(run: SynthRun, tmp_path: Path, local: LocalStore) -> None:
    out = list(RCache(tmp_path / "run", hooks=["h1", "h2"], return_ids=True, shuffle=True))
    for h in ("h1", "h2"):
        assert rows(torch.cat([b["states"][h] for b in out]).reshape(-1, 8)) == rows(run.tensor(h).reshape(-1, 8))
    pair = {
        bytes(a.view(torch.uint8).numpy()): bytes(b.view(torch.uint8).numpy())
        for a, b in zip(run.tensor("h1").reshape(-1, 8), run.tensor("h2").reshape(-1, 8), strict=True)
    }
    for b in TokenLoader(tmp_path / "run", hooks=["h1", "h2"], batch_tokens=40, window=2):
        assert b["h1"].shape == b["h2"].shape == (40, 8)
        assert all(
            pair[bytes(x.view(torch.uint8).numpy())] == bytes(y.view(torch.uint8).numpy())
            for x, y in zip(b["h1"], b["h2"], strict=True)
        )
    # A file whose tokens differ between hooks is an error naming it.
    name = run.names[1]
    t = dict(run.files["h2"][name])
    t["input_ids"] = t["input_ids"] + 1
    local.put(f"run/h2/{name}", fmt.encode(t, {}))
    with pytest.raises(FormatError, match=f"h2/{name}.*input_ids differ"):
        list(RCache(tmp_path / "run", hooks=["h1", "h2"]))


def test_bad_files_raise_with_name_or_are_skipped(run: SynthRun, tmp_path: Path, small_ranges: None) -> None:
    folder = tmp_path / "run/h1"
    truncated, corrupted = folder / run.names[2], folder / run.names[4]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(corrupted.read_bytes())
    data[8:40] = b"\xff" * 32
    corrupted.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"{run.names[2]}: truncated"):
        list(RCache(folder))
    cache = RCache(folder, preserve_file_order=True)
    cache.set_file_index(3)
    with pytest.raises(FormatError, match=f"{run.names[4]}: corrupted"):
        list(cache)
    with pytest.warns(UserWarning, match="skipping a bad file"):
        cache = RCache(folder, skip_bad_files=True)
        out = list(cache)
    assert cache.bad_files == 2 and len(out) == 4
    assert torch.equal(torch.cat(out), run.tensor("h1", names=[n for i, n in enumerate(run.names) if i not in (2, 4)]))
    # Deleted after listing: a missing file is an error, not a shorter stream.
    cache = RCache(folder, skip_bad_files=False)
    (folder / run.names[0]).unlink()
    with pytest.raises(NotFoundError, match=run.names[0]):
        list(cache)


def test_background_work_stops(run: SynthRun, tmp_path: Path) -> None:
    cache = RCache(tmp_path / "run/h1", buffer_size=3)
    it = iter(cache)
    next(it)
    assert active_threads()
    cache.finalize()
    assert active_threads() == []
    with pytest.raises(RuntimeError, match="consumer"), RCache(tmp_path / "run/h1") as cache:
        for _ in cache:
            raise RuntimeError("consumer failed")
    assert active_threads() == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the consumer, no `with`, no finalize()
        for _ in RCache(tmp_path / "run/h1", buffer_size=4):
            raise KeyboardInterrupt
    assert active_threads() == []
    loader = TokenLoader(tmp_path / "run/h1", batch_tokens=8)
    for _ in loader:
        break
    loader.finalize()
    assert active_threads() == []


def test_legacy_pt(tmp_path: Path) -> None:
    folder = tmp_path / "old/hook"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    saved = []
    for n in range(2):
        mb = {
            "states": torch.randn(3, 5, 4, generator=g).to(torch.bfloat16),
            "input_ids": torch.randint(0, 9, (3, 5), generator=g),
        }
        torch.save(mb, folder / f"{uuid.UUID(int=n)}--{n}.pt")
        saved.append(mb)
    out = list(RCache(folder, return_ids=True))
    for b, mb in zip(out, saved, strict=True):
        assert torch.equal(b["states"], mb["states"]) and torch.equal(b["input_ids"], mb["input_ids"])
        assert torch.equal(b["positions"][1], torch.arange(5, dtype=torch.int32))


def original_tokens(vault: OriginalVault, hook: str) -> Counter[bytes]:
    """Multiset of (state, input_id, position in its row) of every token of an original vault."""
    s, i = vault.tensor(hook), vault.tensor(hook, "input_ids")
    p = torch.arange(s.shape[1], dtype=torch.int32).expand(s.shape[0], -1)
    return triples(s.reshape(-1, s.shape[-1]), i.reshape(-1), p.reshape(-1))


def read_original(uri: str, vault: OriginalVault) -> None:
    """RCache and TokenLoader give exactly the tensors the original saved, in every hook."""
    h0, h1 = vault.hooks
    with RCache(f"{uri}/{h0}", return_ids=True) as cache:
        out = list(cache)
    assert torch.equal(torch.cat([b["states"] for b in out]), vault.tensor(h0))
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), vault.tensor(h0, "input_ids"))
    assert all(torch.equal(b["positions"][0], torch.arange(out[0]["states"].shape[1], dtype=torch.int32)) for b in out)
    both = list(RCache(uri, hooks=vault.hooks, shuffle=True, preserve_file_order=False, seed=1))
    d = vault.tensor(h1).shape[-1]
    assert rows(torch.cat([b[h1] for b in both]).reshape(-1, d)) == rows(vault.tensor(h1).reshape(-1, d))
    tl = TokenLoader(f"{uri}/{h1}", batch_tokens=10, drop_last=False, return_ids=True)
    got = sum((triples(b["states"], b["input_ids"], b["positions"]) for b in tl), Counter())
    assert got == original_tokens(vault, h1)
    with pytest.raises(
        FormatError, match="statistics.json holds the original Activault's statistics, which are not exact"
    ):
        TokenLoader(f"{uri}/{h0}", batch_tokens=10, center=True)


def test_an_original_activault_vault_reads_as_it_was_saved(local: LocalStore, tmp_path: Path) -> None:
    vault = write_original_vault(local, "run", ["models.layers.24.mlp.post", "models.layers.36.mlp.post"], files=3)
    read_original(str(tmp_path / "run"), vault)


def test_an_original_vaults_metadata_that_lies_is_named(local: LocalStore, tmp_path: Path) -> None:
    vault = write_original_vault(local, "run", ["h", "g"], files=2, batch_size=2, batches_per_file=2, seq=8, d=16)
    meta = json.loads(local.get_text("run/h/metadata.json"))
    local.put_text("run/h/metadata.json", json.dumps({**meta, "shape": [4, 8, 32]}))
    with pytest.raises(FormatError, match="shape .4, 8, 32. is not .batch_size, sequence_length, d_in.") as e:
        RCache(tmp_path / "run/h")
    assert str(e.value).startswith(local.url("run/h/metadata.json")) and "rerun" not in str(e.value)
    # A lie that holds together is caught by the first file, naming metadata.json as well.
    local.put_text("run/h/metadata.json", json.dumps({**meta, "d_in": 32, "shape": [4, 8, 32]}))
    with pytest.raises(FormatError) as e:
        list(RCache(tmp_path / "run/h"))
    assert local.url("run/h/metadata.json") in str(e.value) and vault.names[0] in str(e.value)
    assert "original Activault" in str(e.value) and "rerun" not in str(e.value)
    local.delete("run/h/metadata.json")  # not needed: the first file gives the shape
    assert torch.equal(torch.cat(list(RCache(tmp_path / "run/h"))), vault.tensor("h"))


def test_sync_picks_up_new_files(local: LocalStore, tmp_path: Path) -> None:
    first = write_synthetic_run(local, "live", ["h"], files=2)
    cache = RCache(tmp_path / "live/h")
    assert len(cache) == 2
    extra = write_synthetic_run(local, "more", ["h"], files=1, seed=9)
    local.put(f"live/h/{records.file_name(1, 0)}", fmt.encode(extra.files["h"][extra.names[0]], {}))
    assert cache.sync() == 1 and len(cache) == 3
    assert torch.equal(torch.cat(list(cache)), torch.cat([first.tensor("h"), extra.tensor("h")]))


# -- S3 (moto server) ------------------------------------------------------------------------------


@pytest.fixture
def bucket(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    create_bucket(moto_url, name)
    for k, v in s3_env(moto_url).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("S3_BUCKET_NAME", name)
    return name


@pytest.mark.s3
def test_quick_usage_on_s3(bucket: str, small_ranges: None) -> None:
    run = write_synthetic_run(S3Store(f"s3://{bucket}"), "run_name", ["hook_name"], files=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The README's snippet, as written (the device falls back to the CPU here).
    cache = S3RCache.from_credentials(
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        s3_prefix="run_name/hook_name",
        device=device,
        return_ids=True,
    )
    got = []
    for batch in cache:
        batch["states"]  # [n, seq_len, d_model]
        batch["input_ids"]  # [n, seq_len]
        got.append(batch)
    cache.finalize()
    assert torch.equal(torch.cat([b["states"].cpu() for b in got]), run.tensor("hook_name"))
    assert torch.equal(torch.cat([b["input_ids"].cpu() for b in got]), run.tensor("hook_name", "input_ids").long())
    assert active_threads() == []


@pytest.mark.s3
def test_an_original_activault_vault_on_s3(bucket: str, small_ranges: None) -> None:
    hooks = ["models.layers.24.mlp.post", "models.layers.36.mlp.post"]
    vault = write_original_vault(S3Store(f"s3://{bucket}"), "run_name", hooks, files=3, dtype=torch.bfloat16)
    read_original(f"s3://{bucket}/run_name", vault)
    # The original's own README snippet, against the vault it wrote.
    cache = S3RCache.from_credentials(
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        s3_prefix=f"run_name/{hooks[0]}",
        device="cpu",
        return_ids=True,
    )
    got = list(cache)
    cache.finalize()
    d = vault.tensor(hooks[0]).shape[-1]
    assert rows(torch.cat([b["states"] for b in got]).reshape(-1, d)) == rows(vault.tensor(hooks[0]).reshape(-1, d))


@pytest.mark.s3
def test_s3_unsigned_uri_and_errors(bucket: str, small_ranges: None) -> None:
    store = S3Store(f"s3://{bucket}")
    run = write_synthetic_run(store, "r", ["a", "b"], files=2)
    make_public(os.environ["S3_ENDPOINT_URL"], bucket)
    with RCache(f"s3://{bucket}/r", hooks=["a", "b"], store_options={"unsigned": True}) as cache:
        out = list(cache)
    assert torch.equal(torch.cat([b["b"] for b in out]), run.tensor("b"))
    tl = TokenLoader(f"s3://{bucket}/r/a", batch_tokens=16, drop_last=False, return_ids=True)
    got = sum((triples(b["states"], b["input_ids"], b["positions"]) for b in tl), Counter())
    assert got == tokens(run, "a")
    raw = bytes(store.get(f"r/a/{run.names[1]}"))
    store.put(f"r/a/{run.names[1]}", raw[: len(raw) // 2])
    with pytest.raises(FormatError, match=f"s3://{bucket}/r/a/{run.names[1]}"):
        list(RCache(f"s3://{bucket}/r/a"))


@pytest.mark.s3
def test_s3_dataloader_workers(bucket: str) -> None:
    run = write_synthetic_run(S3Store(f"s3://{bucket}"), "r", ["h"], files=4)
    ds = ActivationDataset(f"s3://{bucket}/r/h")
    # This process has used S3: forked workers would hang in obstore, so they fail with the fix instead.
    with pytest.raises(ConfigError, match="spawn"):
        list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"))
    out = list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn", timeout=60))
    assert rows(torch.cat(out)) == rows(run.tensor("h"))


def test_cuda_device_without_cuda_is_one_clear_error(
    run: SynthRun, local: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on any machine
    with pytest.raises(ConfigError, match="no usable CUDA device; use device='cpu'"):
        RCache(local.url("run/h1"), device="cuda")


def test_a_second_reader_reads_into_the_first_readers_warm_buffers(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.collect()  # earlier tests' streams retire their buffers now, not into this test's pool
    monkeypatch.setattr(buffers, "_spare", [])
    monkeypatch.setattr(buffers, "PREFAULT_BYTES", 1024)  # these files are a few KiB
    # No pre-faults: one still in flight when a reader is dropped would take a spare buffer first
    # (tests/reading/test_buffers.py covers them); this test is about handing buffers on.
    monkeypatch.setattr(buffers.ReadBuffers, "_warm_next", lambda self, nbytes: None)
    first = RCache(tmp_path / "run/h1", store_options={"map_reads": False})
    used = {s.untyped_storage().data_ptr() for s in first}
    second = [s.clone() for s in first if not used.add(s.untyped_storage().data_ptr())]
    assert torch.equal(torch.cat(second), run.tensor("h1"))  # every buffer the first reader holds is in `used`
    del first
    gc.collect()
    again = RCache(tmp_path / "run/h1", store_options={"map_reads": False})
    it = iter(again)
    assert next(it).untyped_storage().data_ptr() in used  # no new memory to fault in
    assert torch.equal(
        torch.cat([*[s.clone() for s in it]]), run.tensor("h1")[len(run.files["h1"][run.names[0]]["states"]) :]
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_return_ids_yields_each_tokens_document(tmp_path: Path, shuffle: bool) -> None:
    run = write_synthetic_run(LocalStore(tmp_path), "r", ["h1", "h2"], documents=True)
    cache = RCache(tmp_path / "r", hooks=["h1", "h2"], return_ids=True, shuffle=shuffle, seed=3)
    for name, item in zip(run.names, cache, strict=True):
        stored = run.files["h1"][name]
        assert item["documents"].dtype == torch.int64
        # shuffled or not, each token keeps its own (id, position, document)
        want = sorted(
            zip(*(stored[k].reshape(-1).tolist() for k in ("input_ids", "positions", "documents")), strict=True)
        )
        got = sorted(zip(*(item[k].reshape(-1).tolist() for k in ("input_ids", "positions", "documents")), strict=True))
        assert got == want
        assert torch.equal(item["documents"], stored["documents"]) != shuffle
