"""AlignedLoader over two runs holding the same tokens (local folders and a moto S3 server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

from activault.errors import ConfigError, FormatError
from activault.reading.aligned import AlignedLoader
from activault.reading.options import TokenFilter
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


def test_shuffled_token_batches_take_each_files_tokens_stratified(store: Store) -> None:
    # As TokenLoader's windows: a batch takes at most one token of each `kept // batch_tokens`
    # neighbours of a file, where a file's uniform permutation put a document's tokens together.
    run = write_synthetic_run(store, "s", HOOKS, machines=2, files=2, rows=16, documents=True)
    negated_copy(store, run, "t")
    a, b, B = store.url("s"), store.url("t"), 32
    where: dict[bytes, tuple[str, int, int]] = {}  # a token's states -> (its file, index among its kept, kept)
    for name in run.names:
        states, pos = run.tensor("h1", names=[name]).reshape(-1, 8), run.tensor("h1", "positions", [name]).reshape(-1)
        kept = (pos >= 0).nonzero().flatten().tolist()
        for k, i in enumerate(kept):
            where[states[i].view(torch.uint8).numpy().tobytes()] = (name, k, len(kept))
    with AlignedLoader([a, b], HOOKS, batch_tokens=B, shuffle=True, seed=2, return_ids=True) as loader:
        got = list(loader)
    assert sum(len(g["input_ids"]) for g in got) == len(where)
    for g in got:
        assert torch.equal(g["states"][b]["h1"], -g["states"][a]["h1"])  # one order for both runs
        spots = [where[row.view(torch.uint8).numpy().tobytes()] for row in g["states"][a]["h1"]]
        for name in {f for f, _, _ in spots}:
            strata = [k // max(1, n // B) for f, k, n in spots if f == name]
            assert len(set(strata)) == len(strata)
    order = [where[row.view(torch.uint8).numpy().tobytes()][1] for row in got[0]["states"][a]["h1"]]
    assert order != sorted(order)  # shuffled indeed


def test_a_state_of_the_uniform_token_shuffle_resumes_only_at_a_file_boundary(pair: tuple[Store, SynthRun]) -> None:
    store, _ = pair
    runs = [store.url("a"), store.url("b")]
    kw: dict[str, Any] = {"batch_tokens": 10, "shuffle": True, "seed": 3, "return_ids": True}
    with AlignedLoader(runs, HOOKS, **kw) as first:
        take(first, 2)
        mid = first.state_dict()
    assert mid["offset"] > 0 and mid["shuffle_order"] == "numpy-pcg64-strata"
    old = {k: v for k, v in mid.items() if k != "shuffle_order"}  # saved by the uniform shuffle of each file
    with AlignedLoader(runs, HOOKS, **kw) as again, pytest.raises(ConfigError) as e:
        again.load_state_dict(old)
    assert "saved mid-file" in str(e.value) and "file boundary (offset 0)" in str(e.value)
    # At a file boundary no token of the file was taken: resumed as a state of this loader.
    with AlignedLoader(runs, HOOKS, **kw) as again, AlignedLoader(runs, HOOKS, **kw) as fresh:
        again.load_state_dict({**old, "file_index": 1, "offset": 0})
        fresh.load_state_dict({**mid, "file_index": 1, "offset": 0})
        rest = list(again)
        assert rest and all(same(x, y) for x, y in zip(rest, list(fresh), strict=True))


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


# -- resume ---------------------------------------------------------------------------------------


def copy(item: Any) -> Any:
    """`item` with its tensors cloned (a megabatch's are views of buffers the reader reuses)."""
    return {k: copy(v) for k, v in item.items()} if isinstance(item, dict) else item if item is None else item.clone()


def take(loader: AlignedLoader, n: int) -> list[Any]:
    """The next `n` items, epoch after epoch (an epoch resumed at its end yields nothing)."""
    out: list[Any] = []
    for _ in range(4):
        if len(out) == n:  # the state stays right after the last item taken
            return out
        for item in loader:
            out.append(copy(item))
            if len(out) == n:
                break
    assert len(out) == n, f"{len(out)} items, not {n}"
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("batch_tokens", [None, 10, 100])  # megabatches; mid-file; spanning files
def test_resume_gives_exactly_the_uninterrupted_batches(pair: tuple[Store, SynthRun], batch_tokens: int | None) -> None:
    store, _ = pair
    runs = [store.url("a"), store.url("b")]
    kw: dict[str, Any] = {"batch_tokens": batch_tokens, "shuffle": True, "seed": 3, "return_ids": True}
    with AlignedLoader(runs, HOOKS, **kw) as loader:
        per_epoch = len(list(loader))
    with AlignedLoader(runs, HOOKS, **kw) as loader:
        whole = take(loader, 2 * per_epoch)
    assert len(whole) == 2 * per_epoch > 3
    for k in sorted({0, 1, 2, per_epoch - 1, per_epoch, per_epoch + 1}):
        with AlignedLoader(runs, HOOKS, **kw) as first:
            got = take(first, k)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
        with AlignedLoader(runs, HOOKS, **kw) as second:
            second.load_state_dict(state)
            got += take(second, 2 * per_epoch - k)
        assert all(same(a, b) for a, b in zip(got, whole, strict=True)), k


def test_resume_is_per_rank_and_refuses_another_ranks_state(pair: tuple[Store, SynthRun]) -> None:
    store, _ = pair
    runs = [store.url("a"), store.url("b")]
    kw: dict[str, Any] = {"batch_tokens": 20, "world_size": 2, "return_ids": True}
    seen = []
    for rank in (0, 1):
        with AlignedLoader(runs, HOOKS, rank=rank, **kw) as loader:
            whole = list(loader)
        with AlignedLoader(runs, HOOKS, rank=rank, **kw) as first:
            got = take(first, 2)
            state = first.state_dict()
        with AlignedLoader(runs, HOOKS, rank=rank, **kw) as second:
            second.load_state_dict(state)
            got += [copy(i) for i in second]
        assert all(same(a, b) for a, b in zip(got, whole, strict=True)) and len(got) == len(whole)
        seen.append(torch.cat([g["input_ids"] for g in whole]))
    assert len(seen[0]) != len(seen[1]) or not torch.equal(seen[0], seen[1])  # the ranks read other files
    with AlignedLoader(runs, HOOKS, rank=1, **kw) as other, pytest.raises(ConfigError) as e:
        other.load_state_dict(state | {"rank": 0})
    assert "rank=0" in str(e.value) and "make the loader with rank=0" in str(e.value)


def test_a_state_of_other_runs_hooks_or_options_is_refused_by_name(pair: tuple[Store, SynthRun]) -> None:
    store, _ = pair
    a, b = store.url("a"), store.url("b")
    with AlignedLoader([a, b], HOOKS, batch_tokens=10) as loader:
        take(loader, 3)
        state = loader.state_dict()
    cases: list[tuple[list[str], list[str], dict[str, Any], str]] = [
        ([b, a], HOOKS, {"batch_tokens": 10}, "the same runs, named as then and in the same order"),
        ([a, b], ["h1"], {"batch_tokens": 10}, "hooks=['h1', 'h2']"),
        ([a, b], HOOKS, {"batch_tokens": 12}, "batch_tokens=10"),
        ([a, b], HOOKS, {"batch_tokens": 10, "shuffle": True}, "shuffle=False"),
        ([a, b], HOOKS, {"batch_tokens": 10, "seed": 1}, "seed=0"),
        ([a, b], HOOKS, {"batch_tokens": 10, "split": "train"}, "the same split, test_fraction and split_seed"),
        ([a, b], HOOKS, {"batch_tokens": 10, "token_filter": TokenFilter(first=1)}, "the same token_filter"),
    ]
    for runs, hooks, kw, fix in cases:
        with AlignedLoader(runs, hooks, **kw) as other, pytest.raises(ConfigError) as e:
            other.load_state_dict(state)
        assert fix in str(e.value) and "to resume it" in str(e.value), (kw, str(e.value))
    with AlignedLoader([a, b], HOOKS) as megabatches:
        with pytest.raises(ConfigError, match="AlignedLoader state_dict: no file_index"):
            megabatches.load_state_dict({"epoch": 0, "window": 0, "offset": 0})  # a TokenLoader's
        with pytest.raises(ConfigError, match="'offset' is 5, not a whole number 0..0"):
            megabatches.load_state_dict({**state, "batch_tokens": None, "offset": 5})  # megabatches are whole
        with pytest.raises(ConfigError, match="'file_index' is 99"):
            megabatches.load_state_dict({**state, "batch_tokens": None, "file_index": 99})


def test_an_offset_beyond_the_files_tokens_is_named_when_the_file_is_read(pair: tuple[Store, SynthRun]) -> None:
    store, _ = pair
    runs = [store.url("a"), store.url("b")]
    with AlignedLoader(runs, HOOKS, batch_tokens=10) as loader:
        loader.load_state_dict({**loader.state_dict(), "offset": 64})  # 4 rows x 16: one past the last
        with pytest.raises(ConfigError, match="'offset' is 64, not a whole number 0..63 .* other filters"):
            list(loader)


def test_filters_drop_a_token_from_every_run_and_resume_exactly(pair: tuple[Store, SynthRun]) -> None:
    store, run = pair
    name = run.names[1]

    def loud(t: dict[str, torch.Tensor]) -> None:
        t["states"][0, 5] = 1e3  # run b's filter alone drops this token

    for h in HOOKS:
        rewrite(store, f"b/{h}/{name}", loud)
    runs = [store.url("a"), store.url("b")]
    kw: dict[str, Any] = {"token_filter": TokenFilter(first=1, max_norm=100.0), "split": "train", "seed": 5}
    with AlignedLoader(runs, HOOKS, return_ids=True, **kw) as megabatches:
        items = [copy(i) for i in megabatches]
    with RCache(runs[0], hooks=HOOKS, **kw) as alone:
        assert [bool(i["keep"][0, 5]) for i in alone][1]  # run a's own filter keeps the token
    assert not items[1]["keep"][0, 5]
    with AlignedLoader(runs, HOOKS, batch_tokens=10, return_ids=True, **kw) as loader:
        whole = list(loader)
    states = torch.cat([g["states"][runs[0]]["h1"] for g in whole])
    assert len(states) == sum(int(i["keep"].sum()) for i in items)  # the joined mask, in both runs
    assert not (torch.cat([g["states"][runs[1]]["h1"] for g in whole]).float().abs() >= 1e3).any()
    with AlignedLoader(runs, HOOKS, batch_tokens=10, return_ids=True, **kw) as first:
        got = take(first, 3)
        state = first.state_dict()
    with AlignedLoader(runs, HOOKS, batch_tokens=10, return_ids=True, **kw) as second:
        second.load_state_dict(state)
        got += list(second)
    assert all(same(a, b) for a, b in zip(got, whole, strict=True)) and len(got) == len(whole)
