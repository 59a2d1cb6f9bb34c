"""Token filters at read time: each alone and composed on a run with planted sinks, counted, resumed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_rcache import triples

from activault.errors import ConfigError, DataError, NotFoundError
from activault.reading import filters
from activault.reading.filters import FILTERS, TokenMask, document_ranks, special_token_ids
from activault.reading.options import ReadOptions, TokenFilter
from activault.reading.rcache import RCache
from activault.reading.tokens import TokenLoader
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.tools.tiny import build_tokenizer
from activault.vault import records
from activault.vault.norms import token_norms
from support.norms import as_format_4
from support.synth import SynthRun, as_stats_version_2, s3_env, write_synthetic_run

# (hook, file, row, seq, value): two attention sinks (one per hook) and one NaN, in dimension 0.
PLANTED = [("h1", 0, 0, 3, 900.0), ("h2", 4, 1, 5, -700.0), ("h1", 2, 2, 7, float("nan"))]
IDS = frozenset(range(0, 1000, 7))


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def sinks(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | Store, SynthRun]:
    """A two-hook run on two machines with planted sinks and a NaN, its files with stored norms
    (format version 5): its folder, locally or on moto."""
    if request.param == "local":
        return str(tmp_path / "r"), write_synthetic_run(
            LocalStore(tmp_path), "r", ["h1", "h2"], machines=2, nonfinite=PLANTED, documents=True
        )
    store = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=s3_env(request.getfixturevalue("moto_url")))
    return S3Store(store.url("r"), env=s3_env(request.getfixturevalue("moto_url"))), write_synthetic_run(
        store, "r", ["h1", "h2"], machines=2, nonfinite=PLANTED, documents=True
    )


def reference_ranks(p: list[int]) -> list[int]:
    """Each token's index among its document's stored tokens, one token at a time."""
    out, prev, r = [], None, 0
    for x in p:
        r = 0 if prev is None or x <= prev else r + 1
        out.append(r)
        prev = x
    return out


def expected(run: SynthRun, f: TokenFilter, limits: list[float]) -> tuple[Counter[bytes], dict[str, int]]:
    """The h1 tokens `f` keeps and each filter's drops, computed token by token (float64 norms)."""
    counts = dict.fromkeys(FILTERS, 0)
    kept = []
    for name in run.names:
        files = [run.files[h][name] for h in run.hooks]
        p = files[0]["positions"].reshape(-1).tolist()
        ids = files[0]["input_ids"].reshape(-1).tolist()
        ranks = reference_ranks(p)
        states = [x["states"].reshape(len(p), -1).double() for x in files]
        for t in range(len(p)):
            if p[t] < 0:
                continue
            why = [
                ("positions", p[t] < f.positions_below or (f.positions_from is not None and p[t] >= f.positions_from)),
                ("first", ranks[t] < f.first),
                ("ids", ids[t] in f.drop_ids),
                ("nonfinite", f.nonfinite and any(not bool(torch.isfinite(s[t]).all()) for s in states)),
                ("norm", any(float(s[t].norm()) > lim for s, lim in zip(states, limits, strict=False))),
            ]
            first = next((n for n, drop in why if drop), None)
            if first is None:
                kept.append((name, t))
            else:
                counts[first] += 1
    s, i, p = (
        torch.stack([run.files["h1"][n][k].reshape(-1, *run.files["h1"][n][k].shape[2:])[t] for n, t in kept])
        for k in ("states", "input_ids", "positions")
    )
    return triples(s, i, p), counts


FILTER_CASES = {
    "positions": TokenFilter(positions_below=2, positions_from=9),
    "first": TokenFilter(first=2),
    "ids": TokenFilter(drop_ids=IDS),
    "nonfinite": TokenFilter(nonfinite=True),
    "norm": TokenFilter(max_norm_ratio=10.0),
    "composed": TokenFilter(positions_from=12, first=1, drop_ids=IDS, nonfinite=True, max_norm_ratio=10.0),
}


def read_h1(loader: TokenLoader) -> Counter[bytes]:
    out = list(loader)
    return triples(
        *(torch.cat([b[k] if k != "states" else b[k]["h1"] for b in out]) for k in ("states", "input_ids", "positions"))
    )


@pytest.mark.parametrize("case", FILTER_CASES)
def test_each_filter_alone_and_composed_drops_exactly_its_tokens(
    sinks: tuple[str | Store, SynthRun], case: str
) -> None:
    uri, run = sinks
    f = FILTER_CASES[case]
    loader = TokenLoader(
        uri, hooks=["h1", "h2"], batch_tokens=16, window=2, drop_last=False, return_ids=True, token_filter=f
    )
    medians = [run.stats[h].median_norm() for h in run.hooks]
    limits = [10.0 * m for m in medians] if f.max_norm_ratio else []
    assert loader.norm_limits == limits
    want, counts = expected(run, f, limits)
    assert read_h1(loader) == want
    assert loader.filtered == counts
    if case in FILTERS:  # alone: only it drops
        assert counts[case] > 0 and sum(counts.values()) == counts[case]
    else:  # composed: several filters drop tokens, each counted once
        assert sum(n > 0 for n in counts.values()) >= 3
    if case == "norm":  # exactly the two sinks (the NaN's norm is not over the limit: it is kept)
        assert counts["norm"] == 2
    if case == "nonfinite":
        assert loader.nonfinite_dropped == 1


def test_the_aliases_are_the_filter(tmp_path: Path) -> None:
    run = write_synthetic_run(LocalStore(tmp_path), "r", ["h1"], nonfinite=PLANTED[2:])
    old = TokenLoader(
        tmp_path / "r/h1", batch_tokens=8, seed=3, drop_positions_below=2, drop_nonfinite=True, return_ids=True
    )
    new = TokenLoader(
        tmp_path / "r/h1",
        batch_tokens=8,
        seed=3,
        return_ids=True,
        options=ReadOptions(token_filter={"positions_below": 2, "nonfinite": True}),
    )
    for a, b in zip(old, new, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert old.filtered == new.filtered and old.nonfinite_dropped == 1 and old.filtered["positions"] > 0
    assert old.token_filter == new.token_filter == TokenFilter(positions_below=2, nonfinite=True)
    assert run.names


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_filtered_loaders_resume_exactly_and_are_deterministic(
    sinks: tuple[str | Store, SynthRun], stop_after: int
) -> None:
    uri, _ = sinks
    opts: dict[str, Any] = dict(
        hooks=["h1", "h2"], batch_tokens=12, window=2, seed=5, return_ids=True, token_filter=FILTER_CASES["composed"]
    )
    full, again = list(TokenLoader(uri, **opts)), list(TokenLoader(uri, **opts))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, again, strict=True))
    loader = TokenLoader(uri, **opts)
    with loader:
        for k, _ in enumerate(loader):
            if k + 1 == stop_after:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # as a training checkpoint keeps it
    resumed = TokenLoader(uri, **opts)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - stop_after
    for x, y in zip(rest, full[stop_after:], strict=True):
        assert torch.equal(x["states"]["h2"], y["states"]["h2"]) and torch.equal(x["positions"], y["positions"])
    other = TokenLoader(uri, **{**opts, "token_filter": replace(FILTER_CASES["composed"], first=2)})
    with pytest.raises(ConfigError, match="state was saved with token_filter=.*make the loader with the same filters"):
        other.load_state_dict(state)
    state["norm_limits"] = [1.0, 2.0]  # statistics merged since: other medians
    with pytest.raises(ConfigError, match="norm limits .* start a new loader"):
        TokenLoader(uri, **opts).load_state_dict(state)


def test_document_ranks_count_stored_tokens_whatever_cleaning_did() -> None:
    # Two files of the same documents: stored from position 0 (no cleaning), and from 1 (BOS
    # cleaned), with gaps where a chat's specials were cleaned; a document continues across rows.
    plain = np.array([0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 0, -1, -1])
    cleaned = np.array([1, 2, 5, 1, 2, 1, 3, 4, 6, 7, 8, 1, -1, -1])
    want = [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 0]
    for p in (plain, cleaned):
        assert document_ranks(p)[:12].tolist() == want == reference_ranks(p[:12].tolist())
        keep, dropped = TokenMask(TokenFilter(first=1)).keep([torch.zeros(14, 2)], torch.zeros(14), torch.from_numpy(p))
        assert keep.tolist() == [r > 0 for r in want] + [False, False] and dropped["first"] == 4
    # positions_below counts the cleaned positions: 1 drops the first stored token only without cleaning.
    assert (
        TokenMask(TokenFilter(positions_below=1)).keep(
            [torch.zeros(14, 2)], torch.zeros(14), torch.from_numpy(cleaned)
        )[1]["positions"]
        == 0
    )


def test_a_file_starting_mid_document_continues_it() -> None:
    # The file opens with the rest of a document begun in the previous file (positions 5, 6, ...).
    for p0 in (0, 1):  # without and with a cleaned BOS
        p = np.array([5, 6, 7, p0, p0 + 1, p0 + 2, p0, p0 + 1])
        assert document_ranks(p).tolist() == [5 - p0, 6 - p0, 7 - p0, 0, 1, 2, 0, 1]
        assert document_ranks(p[3:]).tolist() == [0, 1, 2, 0, 1]  # a file that opens a document
    assert document_ranks(np.array([1, 2, 3])).tolist() == [0, 1, 2]  # one document, BOS cleaned
    assert document_ranks(np.array([4, 5])).tolist() == [3, 4]  # one long document's middle
    assert document_ranks(np.zeros(0, np.int32)).tolist() == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_finite_token_whose_squared_norm_overflows_is_not_called_nonfinite(dtype: torch.dtype) -> None:
    """Norms are float32 sums: a token of finite 1e20s overflows there, yet is finite; stored
    norms (format version 5) or computed, the same tokens are dropped."""
    states = torch.randn(1, 4, 8).to(dtype)
    states[0, 1] = 1e20
    states[0, 2, 3] = float("nan")
    states[0, 3, 0] = float("-inf")
    ids, pos = torch.zeros(1, 4, dtype=torch.int32), torch.arange(4, dtype=torch.int32)[None]
    for norms in ([], [token_norms(states)]):
        keep, dropped = TokenMask(TokenFilter(nonfinite=True)).keep([states], ids, pos, norms=norms)
        assert keep.tolist() == [True, True, False, False] and dropped["nonfinite"] == 2
        mask = TokenMask(TokenFilter(nonfinite=True, max_norm=1e3), [1e3])
        keep, dropped = mask.keep([states], ids, pos, norms=norms)
        assert keep.tolist() == [True, False, False, False] and dropped["nonfinite"] == 2 and dropped["norm"] == 1


def test_the_norm_filter_names_statistics_without_a_histogram(tmp_path: Path) -> None:
    write_synthetic_run(LocalStore(tmp_path), "r", ["h1"])
    as_stats_version_2(LocalStore(tmp_path), "r")
    assert records.read_statistics(LocalStore(tmp_path), "r/h1").stats_version == 2  # type: ignore[union-attr]
    with pytest.raises(DataError) as e:
        TokenLoader(tmp_path / "r/h1", batch_tokens=8, token_filter=TokenFilter(max_norm_ratio=4))
    msg = str(e.value)
    for part in (
        "hook 'h1'",
        "stats_version 2",
        "needs stats_version 3",
        "merge-stats RUN` cannot add it",
        "TokenFilter(max_norm=...)",
    ):
        assert part in msg
    loader = TokenLoader(
        tmp_path / "r/h1", batch_tokens=8, token_filter=TokenFilter(max_norm=1.0)
    )  # absolute: no statistics
    assert loader.norm_limits == [1.0] and sum(1 for _ in loader) == 0  # every token's norm is over 1


def test_rcache_masks_what_the_loader_drops(sinks: tuple[str | Store, SynthRun]) -> None:
    uri, run = sinks
    f = FILTER_CASES["composed"]
    cache = RCache(uri, hooks=["h1", "h2"], token_filter=f)
    got = list(cache)
    assert all(set(m) == {"states", "input_ids", "positions", "documents", "keep"} for m in got)
    s, i, p, k = (
        torch.cat([m[key]["h1"] if key == "states" else m[key] for m in got])
        for key in ("states", "input_ids", "positions", "keep")
    )
    k = k.reshape(-1)
    limits = [10.0 * run.stats[h].median_norm() for h in run.hooks]
    want, counts = expected(run, f, limits)
    assert triples(s.reshape(-1, s.shape[-1])[k], i.reshape(-1)[k], p.reshape(-1)[k]) == want
    assert cache.filtered == counts


def test_special_token_ids_come_from_the_runs_tokenizer(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    write_synthetic_run(store, "r", ["h1"])
    with pytest.raises(NotFoundError, match="'synthetic', is not on this machine.*TokenFilter\\(drop_ids="):
        special_token_ids(str(tmp_path / "r"))
    tok = build_tokenizer(tmp_path / "tok")
    rec = records.read_run(store, "r")
    assert rec is not None
    records.write_record(store, records.cfg_key("r"), rec.model_copy(update={"tokenizer": str(tmp_path / "tok")}))
    ids = special_token_ids(str(tmp_path / "r"))
    assert ids == frozenset(tok.all_special_ids) and tok.bos_token_id in ids


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def folders(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, Callable[[str], str | Store]]:
    """An empty store, and what a reader is given for its folder `key` (a path, or an S3Store)."""
    if request.param == "local":
        return LocalStore(tmp_path, fsync=False), lambda key: str(tmp_path / key)
    env = s3_env(request.getfixturevalue("moto_url"))
    root = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=env)
    return root, lambda key: S3Store(root.url(key), env=env)


@pytest.mark.parametrize("case", ["nonfinite", "norm", "composed"])
def test_format_4_and_5_files_keep_the_same_tokens(
    folders: tuple[Store, Callable[[str], str | Store]], case: str
) -> None:
    """The same run as format 5 (norms stored) and format 4 (norms computed from the states): the
    same kept tokens and drop counts, from RCache's masks and TokenLoader's batches."""
    store, at = folders
    overflow = [("h2", 3, 0, 4, 1e20)]  # finite, its squares beyond float32: an Inf norm, kept by nonfinite
    for run in ("new", "old"):  # the same seed: the same data
        synth = write_synthetic_run(store, run, ["h1", "h2"], machines=2, nonfinite=PLANTED + overflow, documents=True)
    as_format_4(store, "old", synth.hooks, synth.names)
    f = FILTER_CASES[case]
    caches = [RCache(at(run), hooks=["h1", "h2"], token_filter=f) for run in ("new", "old")]
    masks = [[m["keep"] for m in cache] for cache in caches]
    assert len(masks[0]) == len(synth.names) and all(torch.equal(a, b) for a, b in zip(*masks, strict=True))
    loaders = [
        TokenLoader(at(run), hooks=["h1", "h2"], batch_tokens=16, window=2, seed=1, return_ids=True, token_filter=f)
        for run in ("new", "old")
    ]
    batches = [list(loader) for loader in loaders]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*batches, strict=True))
    assert loaders[0].filtered == loaders[1].filtered == caches[0].filtered == caches[1].filtered
    assert caches[0].filtered[case if case in FILTERS else "norm"] > 0
    if case == "nonfinite":
        assert caches[0].filtered["nonfinite"] == 1  # the NaN, not the overflowing finite token


def test_stored_norms_spare_the_states_pass(
    sinks: tuple[str | Store, SynthRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With norms stored, no norm is computed from the states, and only tokens whose stored norm is
    not finite are looked at again."""
    uri, _ = sinks
    looked: list[int] = []

    def refuse(states: torch.Tensor) -> torch.Tensor:
        raise AssertionError("norms computed from the states of a file that stores them")

    def finite_rows(x: torch.Tensor) -> np.ndarray:
        looked.append(x.shape[0])
        return torch.isfinite(x).all(dim=1).numpy()

    monkeypatch.setattr(filters, "token_norms", refuse)
    monkeypatch.setattr(filters, "finite_rows", finite_rows)
    f = TokenFilter(nonfinite=True, max_norm_ratio=10.0)
    loader = TokenLoader(uri, hooks=["h1", "h2"], batch_tokens=16, token_filter=f)
    assert sum(1 for _ in loader) > 0 and loader.filtered["nonfinite"] == 1 and loader.filtered["norm"] == 2
    assert sum(looked) == 1  # the one NaN token
