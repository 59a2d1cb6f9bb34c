"""TokenLoader's weighted mixture of runs: the schedule alone, then mixtures of synthetic runs, local and on moto."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from activault.errors import ConfigError
from activault.reading.mixing import allocation, feed_strata, mix_weights, quotas
from activault.reading.tokens import TokenLoader
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from support.synth import SynthRun, s3_env, write_synthetic_run

B = 20  # tokens a batch: small, so the runs are exhausted and restarted within a test


# ---- the schedule, alone ----


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [1.0, 1.0, 1.0], [0.85, 0.15]])
@pytest.mark.parametrize("batch", [7, 4096])
def test_quotas_are_exact_over_every_span_of_batches(weights: list[float], batch: int) -> None:
    w = mix_weights(weights, len(weights), batch, [f"run{i}" for i in range(len(weights))])
    q = [quotas(w, batch, k) for k in range(300)]
    assert all(sum(b) == batch and min(b) >= 0 for b in q)
    totals = [0] * len(w)
    for k, b in enumerate(q):
        totals = [t + n for t, n in zip(totals, b, strict=True)]
        assert totals == allocation(w, (k + 1) * batch)
        assert all(abs(t - (k + 1) * batch * wi) < 1 for t, wi in zip(totals, w, strict=True))
    # Any span of whole batches (e.g. 1M tokens of 4096-token batches) strays under 2 tokens per run.
    for start in range(0, 300, 37):
        for end in range(start + 1, 301, 53):
            span = [sum(b[i] for b in q[start:end]) for i in range(len(w))]
            assert all(abs(n - (end - start) * batch * wi) < 2 for n, wi in zip(span, w, strict=True))


def test_allocation_rounds_as_exact_fractions_do() -> None:
    def reference(weights: list[Fraction], tokens: int) -> list[int]:  # largest remainder, in Fractions
        exact = [tokens * w for w in weights]
        out = [math.floor(x) for x in exact]
        ranked = sorted(range(len(out)), key=lambda i: (-(exact[i] - out[i]), i))
        return [o + (i in ranked[: tokens - sum(out)]) for i, o in enumerate(out)]

    for weights in ([0.7, 0.3], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0], [1 / 3, 1 / 7, 0.5]):
        w = mix_weights(weights, len(weights), 4096, [f"run{i}" for i in range(len(weights))])
        for tokens in [0, 1, 2, 3, 7, 4095, 4096, 10**6 + 1, 2**40 + 3]:
            assert allocation(w, tokens) == reference(w, tokens), (weights, tokens)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [1 / 3, 1 / 7, 0.5], [0.99, 0.01]])
@pytest.mark.parametrize("batch", [100, 256, 4096])
def test_a_runs_strata_bound_every_quota(weights: list[float], batch: int) -> None:
    # A batch's share of a run is at most its strata: consecutive tokens of a run's stratified order
    # that many at a time come from distinct strata (window.py `stratified`).
    w = mix_weights(weights, len(weights), batch, [f"run{i}" for i in range(len(weights))])
    most = [max(quotas(w, batch, k)[i] for k in range(500)) for i in range(len(w))]
    assert all(m <= feed_strata(wi, batch) <= m + 2 for m, wi in zip(most, w, strict=True))


def test_weights_are_checked() -> None:
    with pytest.raises(ConfigError, match="weights=.*one per run"):
        mix_weights([0.5], 2, 8, ["a", "b"])
    with pytest.raises(ConfigError, match="weights=.*finite numbers > 0"):
        mix_weights([1.0, -1.0], 2, 8, ["a", "b"])
    with pytest.raises(ConfigError, match="gives b .* less than one: raise batch_tokens to at least 100 "):
        mix_weights([0.99, 0.01], 2, 8, ["a", "b"])
    assert mix_weights([3, 1], 2, 8, ["a", "b"]) == [Fraction(3, 4), Fraction(1, 4)]


# ---- mixtures of synthetic runs ----


def _runs(store: Store, **kw: Any) -> tuple[SynthRun, SynthRun]:
    a = write_synthetic_run(store, "a", ["h"], files=3, seed=1, **kw)
    b = write_synthetic_run(store, "b", ["h"], files=2, seed=2, **kw)
    return a, b


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, list[Any]]:
    """(the store the runs are written to, the URIs of runs a and b)."""
    if request.param == "local":
        return LocalStore(tmp_path, fsync=False), [str(tmp_path / "a"), str(tmp_path / "b")]
    url = request.getfixturevalue("moto_url")
    store = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=s3_env(url))
    return store, [S3Store(store.url("a"), env=s3_env(url)), S3Store(store.url("b"), env=s3_env(url))]


def _owner(runs: tuple[SynthRun, ...]) -> dict[bytes, tuple[int, int]]:
    """Each real token's states bytes -> (run, its index in the run)."""
    out = {}
    for r, run in enumerate(runs):
        states, pos = run.tensor("h").reshape(-1, 8), run.tensor("h", "positions").reshape(-1)
        for i in torch.nonzero(pos >= 0).flatten().tolist():
            out[states[i].view(torch.uint8).numpy().tobytes()] = (r, i)
    return out


def _who(batch: torch.Tensor, owner: dict[bytes, tuple[int, int]]) -> list[tuple[int, int]]:
    return [owner[row.view(torch.uint8).numpy().tobytes()] for row in batch]


def _take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    """The next `n` batches' states `[B, d]` of the one hook."""
    return [x["h"].clone() for x in islice(loader, n)]


def _kept(run: SynthRun) -> int:
    return int((run.tensor("h", "positions") >= 0).sum())


def test_proportions_and_exhausted_runs_restart(where: tuple[Store, list[Any]]) -> None:
    store, uris = where
    runs = _runs(store)
    owner = _owner(runs)
    loader = TokenLoader(uris, hooks=["h"], weights=[0.7, 0.3], batch_tokens=B, loop=True, seed=3, window=2)
    w = loader.weights
    assert w is not None
    got = [_who(x, owner) for x in _take(loader, 60)]  # 1,200 tokens: run b (125 tokens) read ~3 times
    seen: list[list[int]] = [[], []]
    for k, batch in enumerate(got):
        counts = [sum(1 for r, _ in batch if r == i) for i in range(2)]
        assert counts == quotas(w, B, k)
        for r, i in batch:
            seen[r].append(i)
    for r, run in enumerate(runs):
        n = _kept(run)
        # Each epoch of a run is its every token once; the next epoch starts over, in a new order.
        assert sorted(seen[r][:n]) == sorted({i for rr, i in owner.values() if rr == r})
        assert sorted(seen[r][n : 2 * n]) == sorted(seen[r][:n])
        assert seen[r][n : 2 * n] != seen[r][:n]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    _runs(LocalStore(tmp_path, fsync=False))
    uris = [tmp_path / "a", tmp_path / "b"]

    def read(seed: int) -> list[torch.Tensor]:
        with TokenLoader(uris, hooks=["h"], weights=[0.7, 0.3], batch_tokens=B, loop=True, seed=seed) as loader:
            return _take(loader, 25)

    first, again, other = read(5), read(5), read(6)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_a_batch_is_gathered_in_one_split_of_every_runs_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run's share is planned, then every copy of the batch split over the threads at once (one
    hand-off per batch, not per run), from windows held by the copies until then: run b's window
    ends mid-batch here, and its next one is read before the batch is copied."""
    import activault.reading.mixing as mixing
    import activault.reading.tokens as tokens

    _runs(LocalStore(tmp_path, fsync=False))
    uris = [tmp_path / "a", tmp_path / "b"]

    def read() -> list[torch.Tensor]:
        with TokenLoader(uris, hooks=["h"], weights=[0.7, 0.3], batch_tokens=B, loop=True, seed=5, window=2) as ld:
            return _take(ld, 40)

    calls: list[int] = []
    real, take = tokens.take_rows, mixing.Feed.take
    monkeypatch.setattr(tokens, "take_rows", lambda takes, workers: (calls.append(len(takes)), real(takes, workers)))
    together = read()
    assert len(calls) == 40 and min(calls) >= 2  # every batch: one call, with copies of both runs
    monkeypatch.setattr(mixing.Feed, "take", lambda self, batch, n, g, defer=None: take(self, batch, n, g, None))
    run_by_run = read()  # each run's share copied at once, as before
    assert all(torch.equal(x, y) for x, y in zip(together, run_by_run, strict=True))


@pytest.mark.parametrize("stop_after", [1, 2, 7, 16, 23])
def test_resume_is_exact(where: tuple[Store, list[Any]], stop_after: int) -> None:
    store, uris = where
    _runs(store)

    def make() -> TokenLoader:
        return TokenLoader(uris, hooks=["h"], weights=[2, 1], batch_tokens=B, loop=True, seed=9, window=2)

    whole = _take(make(), 30)
    first = make()
    it = iter(first)
    head = [next(it)["h"].clone() for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))
    first.finalize()
    resumed = make()
    resumed.load_state_dict(state)
    rest = _take(resumed, 30 - stop_after)
    assert all(torch.equal(x, y) for x, y in zip(whole, head + rest, strict=True))


def test_resume_refuses_other_weights_and_single_run_states(tmp_path: Path) -> None:
    _runs(LocalStore(tmp_path, fsync=False))
    uris = [tmp_path / "a", tmp_path / "b"]
    mixed = TokenLoader(uris, hooks=["h"], weights=[2, 1], batch_tokens=B, loop=True)
    other = TokenLoader(uris, hooks=["h"], weights=[1, 1], batch_tokens=B, loop=True)
    with pytest.raises(ConfigError, match="saved with weights .* same runs and weights"):
        other.load_state_dict(mixed.state_dict())
    single = TokenLoader(uris, hooks=["h"], batch_tokens=B)
    with pytest.raises(ConfigError, match="saved by a mixture of runs"):
        single.load_state_dict(mixed.state_dict())
    with pytest.raises(ConfigError, match="not saved by a mixture of runs"):
        mixed.load_state_dict(single.state_dict())


def test_a_state_of_the_old_mixture_order_is_refused_by_name(tmp_path: Path) -> None:
    _runs(LocalStore(tmp_path, fsync=False))
    uris = [tmp_path / "a", tmp_path / "b"]

    def make(**kw: Any) -> TokenLoader:
        return TokenLoader(uris, hooks=["h"], weights=[2, 1], batch_tokens=B, loop=True, seed=9, window=2, **kw)

    first = make()
    with first:
        _take(first, 2)
        mid = first.state_dict()
    # Each run's windows are stratified, the first drawn as its files arrive, as a lone loader's.
    assert mid["shuffle"] == "numpy-pcg64-strata" and mid["ramp"] == "first-window"
    assert any(offset for _, _, offset in mid["mixture"]["runs"])
    # Saved by the uniform shuffle of windows of 1, 2, 4, ... files: other windows, refused by name.
    old = {**mid, "shuffle": "numpy-pcg64", "ramp": True}
    with pytest.raises(ConfigError, match="ramp cut windows of 1, 2, 4, ... files.*start this loader afresh"):
        make().load_state_dict(old)
    # ramp=False cut the same windows then: refused mid-window, resumed exactly at window boundaries.
    with pytest.raises(ConfigError, match="shuffled with 'numpy-pcg64'; this one uses 'numpy-pcg64-strata'"):
        make(ramp=False).load_state_dict({**old, "ramp": False})
    runs = [[e, w + 1, 0] for e, w, _ in mid["mixture"]["runs"]]
    boundary = {**old, "ramp": False, "mixture": {**mid["mixture"], "runs": runs}}
    again, fresh = make(ramp=False), make(ramp=False)
    again.load_state_dict(boundary)
    fresh.load_state_dict({**boundary, "shuffle": "numpy-pcg64-strata"})
    assert all(torch.equal(x, y) for x, y in zip(_take(again, 12), _take(fresh, 12), strict=True))


def test_ranks_read_disjoint_shares(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    a = write_synthetic_run(store, "a", ["h"], files=4, seed=1)
    b = write_synthetic_run(store, "b", ["h"], files=4, seed=2)
    owner = _owner((a, b))
    shares: list[list[set[int]]] = []
    for rank in range(2):
        loader = TokenLoader(
            [tmp_path / "a", tmp_path / "b"], hooks=["h"], weights=[0.5, 0.5], batch_tokens=B,
            loop=True, rank=rank, world_size=2, seed=4,
        )  # fmt: skip
        seen: list[list[int]] = [[], []]
        for x in _take(loader, 30):
            for r, i in _who(x, owner):
                seen[r].append(i)
        # This rank's epoch 0 of each run: the kept tokens of its files.
        sizes = []
        for r, run in enumerate((a, b)):
            names = [f.name for f in loader._runs[r].order(0)]
            sizes.append(int((run.tensor("h", "positions", names) >= 0).sum()))
        shares.append([set(seen[r][: sizes[r]]) for r in range(2)])
        assert all(len(shares[-1][r]) == sizes[r] for r in range(2))
    assert all(not shares[0][r] & shares[1][r] for r in range(2))


def test_loop_false_ends_once_every_run_was_read_whole(tmp_path: Path) -> None:
    runs = _runs(LocalStore(tmp_path, fsync=False))
    owner = _owner(runs)
    loader = TokenLoader([tmp_path / "a", tmp_path / "b"], hooks=["h"], weights=[0.5, 0.5], batch_tokens=B)
    seen: list[set[int]] = [set(), set()]
    batches = [x["h"] for x in loader]
    for x in batches:
        for r, i in _who(x, owner):
            seen[r].add(i)
    assert [len(s) for s in seen] == [_kept(r) for r in runs]
    # The last batch is the one that finished the larger run a: one batch earlier it was not done.
    assert len(batches) == -(-_kept(runs[0]) // (B // 2))


def test_runs_of_other_widths_or_dtypes_are_refused_before_reading(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    write_synthetic_run(store, "a", ["h"], files=1, d=8)
    write_synthetic_run(store, "wide", ["h"], files=1, d=16)
    write_synthetic_run(store, "f32", ["h"], files=1, d=8, dtype=torch.float32)
    with pytest.raises(ConfigError) as e:
        TokenLoader([tmp_path / "a", tmp_path / "wide"], hooks=["h"], weights=[1, 1], batch_tokens=B)
    assert f"{tmp_path}/a/h (d_model=8" in str(e.value) and f"{tmp_path}/wide/h (d_model=16" in str(e.value)
    with pytest.raises(ConfigError, match="f32/h .*dtype=float32"):
        TokenLoader([tmp_path / "a", tmp_path / "f32"], hooks=["h"], weights=[1, 1], batch_tokens=B)
    # Without weights a list is one dataset's prefixes: they must agree on everything (as before).
    with pytest.raises(ConfigError, match="cannot read these prefixes together"):
        TokenLoader([tmp_path / "a", tmp_path / "wide"], hooks=["h"], batch_tokens=B)


def test_runs_of_other_sequence_lengths_mix(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    write_synthetic_run(store, "a", ["h"], files=2, seq=16)
    write_synthetic_run(store, "b", ["h"], files=2, seq=8, seed=5)
    loader = TokenLoader([tmp_path / "a", tmp_path / "b"], hooks=["h"], weights=[1, 1], batch_tokens=B, loop=True)
    assert [x.shape for x in _take(loader, 3)] == [(B, 8)] * 3


@pytest.mark.parametrize("normalize", ["per_run", "pooled"])
def test_normalisation_per_run_or_pooled(tmp_path: Path, normalize: str) -> None:
    store = LocalStore(tmp_path, fsync=False)
    runs = _runs(store)
    owner = _owner(runs)
    uris = [tmp_path / "a", tmp_path / "b"]
    kw: dict[str, Any] = dict(hooks=["h"], weights=[0.6, 0.4], batch_tokens=B, loop=True, seed=1)
    raw = _take(TokenLoader(uris, **kw), 10)
    norm = _take(TokenLoader(uris, center=True, norm_target=2.0, normalize=normalize, **kw), 10)
    stats = [r.stats["h"] for r in runs]
    if normalize == "pooled":
        from activault.vault.stats import merge_all

        stats = [merge_all(stats)] * 2  # type: ignore[list-item]
    for x, y in zip(raw, norm, strict=True):
        for row, out, (r, _) in zip(x, y, _who(x, owner), strict=True):
            s = stats[r]
            scale = 2.0 / float(s.var.sum()) ** 0.5
            expected = (row.float() - s.mean.float()) * scale
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_normalize_defaults_and_refusals(tmp_path: Path) -> None:
    _runs(LocalStore(tmp_path, fsync=False))
    uris = [tmp_path / "a", tmp_path / "b"]
    assert TokenLoader(uris, hooks=["h"], weights=[1, 1], batch_tokens=B).normalize == "per_run"
    assert TokenLoader(uris, hooks=["h"], batch_tokens=B).normalize == "pooled"
    with pytest.raises(ConfigError, match="normalize='per_run' needs weights="):
        TokenLoader(uris, hooks=["h"], batch_tokens=B, normalize="per_run")
    with pytest.raises(ConfigError, match="normalize='both' is not accepted"):
        TokenLoader(uris, hooks=["h"], weights=[1, 1], batch_tokens=B, normalize="both")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="uri=.* is not accepted: uri must be a list of runs"):
        TokenLoader(tmp_path / "a", hooks=["h"], weights=[1], batch_tokens=B)
