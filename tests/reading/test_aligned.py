"""AlignedLoader over two runs holding the same tokens (local folders and a moto S3 server)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from activault.errors import ConfigError, FormatError
from activault.reading.aligned import AlignedLoader
from activault.reading.rcache import RCache
from activault.storage import Store
from activault.storage.s3 import S3Store
from activault.vault import megabatch as fmt
from support.synth import SynthRun, s3_env, write_synthetic_run

HOOKS = ["h1", "h2"]


def rewrite(store: Store, key: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Re-encode a stored file after `change` edits its tensors (checksums made to match: only the
    aligned reader's own check can find it)."""
    mb = fmt.decode(bytes(store.get(key)), store.url(key))
    tensors = {k: v.clone() for k, v in mb.tensors.items()}
    change(tensors)
    assert mb.header is not None
    store.put(key, b"".join(fmt.encode(tensors, mb.header.metadata)))


def negated_copy(store: Store, run: SynthRun, name: str) -> None:
    """Run `name`: `run`'s records and files, each file's states negated (the same tokens, other states)."""
    for entry in store.list(run.run):
        if entry.kind != "file":
            continue
        key = name + entry.key[len(run.run) :]
        store.put(key, bytes(store.get(entry.key)))
        if key.endswith(fmt.SUFFIX):
            rewrite(store, key, lambda t: t.update(states=-t["states"]))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Store:
    if request.param == "local":
        from activault.storage import LocalStore

        return LocalStore(tmp_path, fsync=False)
    url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
    for k, v in s3_env(url).items():
        monkeypatch.setenv(k, v)
    return S3Store(f"s3://{bucket}")


@pytest.fixture
def pair(store: Store) -> tuple[Store, SynthRun]:
    run = write_synthetic_run(store, "a", HOOKS, machines=2, files=2, documents=True)
    negated_copy(store, run, "b")
    return store, run


def test_yields_each_runs_states_for_the_same_tokens(pair: tuple[Store, SynthRun]) -> None:
    store, run = pair
    a, b = store.url("a"), store.url("b")
    with AlignedLoader([a, b], HOOKS, return_ids=True) as loader:
        got = list(loader)
    assert len(got) == len(run.names)
    for h in HOOKS:
        assert torch.equal(torch.cat([g["states"][a][h] for g in got]), run.tensor(h))
        assert torch.equal(torch.cat([g["states"][b][h] for g in got]), -run.tensor(h))
    assert torch.equal(torch.cat([g["input_ids"] for g in got]), run.tensor("h1", "input_ids").long())
    assert torch.equal(torch.cat([g["documents"] for g in got]), run.tensor("h1", "documents"))


def test_shuffle_uses_the_same_permutation_in_every_run(pair: tuple[Store, SynthRun]) -> None:
    store, run = pair
    a, b = store.url("a"), store.url("b")
    with AlignedLoader([a, b], HOOKS, shuffle=True, seed=7, return_ids=True) as loader:
        got = list(loader)
    with RCache(a, hooks=HOOKS, shuffle=True, seed=7) as alone:
        expected = [item["h2"] for item in alone]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g["states"][a]["h2"], e)
        assert torch.equal(g["states"][b]["h2"], -e)  # b permuted as a was, token for token
    ids = torch.cat([g["input_ids"] for g in got])
    assert not torch.equal(ids, run.tensor("h1", "input_ids").long())  # shuffled indeed


def test_token_batches_drop_padding_and_keep_the_runs_together(pair: tuple[Store, SynthRun]) -> None:
    store, run = pair
    a, b = store.url("a"), store.url("b")
    with AlignedLoader([a, b], HOOKS, batch_tokens=10, return_ids=True) as loader:
        got = list(loader)
    real = run.tensor("h1", "positions").reshape(-1) >= 0
    assert [len(g["input_ids"]) for g in got[:-1]] == [10] * (len(got) - 1)
    states = torch.cat([g["states"][a]["h1"] for g in got])
    assert torch.equal(states, run.tensor("h1").reshape(-1, 8)[real])
    assert torch.equal(torch.cat([g["states"][b]["h1"] for g in got]), -states)
    assert bool((torch.cat([g["positions"] for g in got]) >= 0).all())


def test_a_file_whose_ids_differ_is_named(pair: tuple[Store, SynthRun]) -> None:
    store, run = pair
    name = run.names[2]
    key = f"b/h1/{name}"

    def tamper(t: dict[str, torch.Tensor]) -> None:
        t["input_ids"][1, 3] += 1

    rewrite(store, key, tamper)
    rewrite(store, f"b/h2/{name}", tamper)
    with AlignedLoader([store.url("a"), store.url("b")], HOOKS) as loader, pytest.raises(FormatError) as e:
        list(loader)
    msg = str(e.value)
    assert store.url(key) in msg and "input_ids" in msg and "row 1, column 3" in msg
    assert "data_config.align_to" in msg


def test_refuses_what_cannot_stay_aligned(pair: tuple[Store, SynthRun]) -> None:
    store, _ = pair
    a, b = store.url("a"), store.url("b")
    with pytest.raises(ConfigError, match="skip_bad_files"):
        AlignedLoader([a, b], HOOKS, skip_bad_files=True)
    with pytest.raises(ConfigError, match="two or more different runs"):
        AlignedLoader([a, a], HOOKS)
    with pytest.raises(ConfigError, match="batch_tokens"):
        AlignedLoader([a, b], HOOKS, batch_tokens=0)
