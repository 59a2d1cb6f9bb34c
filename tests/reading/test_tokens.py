"""TokenLoader against synthetic runs in a local folder (and a collected tiny run for its index)."""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_rcache import tokens, triples

from activault.collection.pipeline import collect
from activault.errors import ConfigError, DataError
from activault.reading import buffers as buffers_module
from activault.reading import window as window_module
from activault.reading.buffers import ReadBuffers
from activault.reading.dataset import ActivationDataset
from activault.reading.options import ReadOptions
from activault.reading.rcache import RCache
from activault.reading.tokens import TokenLoader
from activault.reading.window import same_source_pairs
from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from activault.tools.context import token_context
from activault.vault import codec as codecs
from activault.vault import records
from activault.vault.runs import merge_run_statistics
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter
from support.collecting import make_cfg
from support.synth import SynthRun, as_stats_version_1, s3_env, write_synthetic_run


@pytest.mark.parametrize("stop_after", [1, 5, 9])
def test_resume_token_loader(run: SynthRun, tmp_path: Path, stop_after: int) -> None:
    # 20-token batches straddle windows of 2 files (128 tokens minus padding): resumes land mid-window.
    opts = dict(batch_tokens=20, window=2, return_ids=True, seed=7, drop_positions_below=1)
    full = list(TokenLoader(tmp_path / "run/h1", **opts))
    loader = TokenLoader(tmp_path / "run/h1", **opts)
    with loader:
        for k, _ in enumerate(loader):
            if k + 1 == stop_after:
                break
        state = loader.state_dict()
    again = TokenLoader(tmp_path / "run/h1", **opts)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(full) - stop_after
    for x, y in zip(rest, full[stop_after:], strict=True):
        assert torch.equal(x["states"], y["states"]) and torch.equal(x["input_ids"], y["input_ids"])


def test_token_loader_covers_kept_tokens(run: SynthRun, tmp_path: Path) -> None:
    out = list(
        TokenLoader(
            tmp_path / "run/h1", batch_tokens=32, window=3, return_ids=True, drop_last=False, drop_positions_below=2
        )
    )
    assert all(b["states"].shape == (32, 8) for b in out[:-1])
    s, i, p = (torch.cat([b[k] for b in out]) for k in ("states", "input_ids", "positions"))
    assert p.min() >= 2
    want = tokens(run, "h1")
    assert triples(s, i, p) == Counter(
        {k: v for k, v in want.items() if int.from_bytes(k[-4:], "little", signed=True) >= 2}
    )
    full = list(TokenLoader(tmp_path / "run/h1", batch_tokens=32, window=3, drop_positions_below=2))
    assert len(full) == len(out) - 1  # drop_last


def flat_tokens(batches: list[dict[str, torch.Tensor]]) -> list[bytes]:
    """Each token of the batches as bytes (state, id, position), in stream order."""
    s, i, p = (torch.cat([b[k] for b in batches]) for k in ("states", "input_ids", "positions"))
    both = torch.cat([s.view(torch.uint8), i.view(-1, 1).view(torch.uint8), p.view(-1, 1).view(torch.uint8)], 1)
    return [bytes(r.numpy()) for r in both]


def test_loop_runs_epochs_back_to_back_and_resumes_exactly(run: SynthRun, tmp_path: Path) -> None:
    opts = dict(window=2, return_ids=True, seed=3, drop_positions_below=1)
    # Each epoch alone (loop=False, its short last batch kept): its own order, the same tokens.
    epochs = []
    for e in range(3):
        one = TokenLoader(tmp_path / "run/h1", batch_tokens=20, drop_last=False, **opts)
        one.load_state_dict({**one.state_dict(), "epoch": e})
        epochs.append([Counter(flat_tokens([b])) for b in one])
    assert len({str(e) for e in epochs}) == 3 and all(sum(e, Counter()) == sum(epochs[0], Counter()) for e in epochs)
    per_epoch = sum(len(list(c.elements())) for c in epochs[0])
    assert per_epoch % 20 != 0  # so batches straddle epoch boundaries
    n = 3 * per_epoch // 20
    looped = TokenLoader(tmp_path / "run/h1", batch_tokens=20, loop=True, **opts)
    stream = list(islice(looped, n))
    looped.finalize()
    assert all(b["states"].shape == (20, 8) for b in stream)
    got = [Counter(flat_tokens([b])) for b in stream]
    whole = per_epoch // 20
    assert got[:whole] == epochs[0][:whole]  # the first epoch's batches, then one across the boundary
    assert got[whole] & epochs[0][whole] == epochs[0][whole]  # the first epoch's short batch, and more
    assert all(c <= 3 for c in sum(got, Counter()).values())  # no token twice in an epoch
    opts["batch_tokens"] = 20
    # Resumed at every batch around the first epoch boundary: the same continuation.
    for k in range(per_epoch // 20 - 1, per_epoch // 20 + 2):
        first = TokenLoader(tmp_path / "run/h1", loop=True, **opts)
        for _ in islice(first, k):
            pass
        state = first.state_dict()
        first.finalize()
        again = TokenLoader(tmp_path / "run/h1", loop=True, **opts)
        again.load_state_dict(state)
        rest = list(islice(again, 4))
        again.finalize()
        assert flat_tokens(rest) == flat_tokens(stream[k : k + 4])


def test_loop_without_tokens_is_an_error(run: SynthRun, tmp_path: Path) -> None:
    # 6 files, 8 ranks: rank 7 reads none, and an endless loop over nothing would hang.
    loader = TokenLoader(tmp_path / "run/h1", batch_tokens=8, rank=7, world_size=8, loop=True)
    with pytest.raises(ConfigError, match="holds no tokens"):
        next(iter(loader))


def test_dropped_tail_is_counted_and_logged(run: SynthRun, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kept = sum(tokens(run, "h1").values())
    with caplog.at_level(logging.INFO, logger="activault.reading"):
        loader = TokenLoader(tmp_path / "run/h1", batch_tokens=32, window=3)
        batches = list(loader)
    assert loader.dropped_tokens == kept - 32 * len(batches) > 0
    assert f"dropped the last {loader.dropped_tokens} tokens" in caplog.text
    tail = list(TokenLoader(tmp_path / "run/h1", batch_tokens=32, window=3, drop_last=False))
    assert len(tail) == len(batches) + 1 and tail[-1].shape == (loader.dropped_tokens, 8)


def test_batches_do_not_depend_on_the_gather_threads(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from activault.reading import tokens as tokens_module
    from activault.reading import window as window_module

    opts = dict(batch_tokens=40, window=3, return_ids=True, seed=3, drop_last=False)
    got = {}
    for threads in (1, 2, 4):
        monkeypatch.setattr(tokens_module, "GATHER_THREADS", threads)
        monkeypatch.setattr(window_module, "GATHER_THREADS", threads)
        got[threads] = list(TokenLoader(tmp_path / "run/h1", **opts))
    for threads in (2, 4):
        assert len(got[threads]) == len(got[1])
        for x, y in zip(got[threads], got[1], strict=True):
            assert all(torch.equal(x[k], y[k]) for k in ("states", "input_ids", "positions"))


# ---- tokens with NaN or Inf ----

# One token of h1 holds NaN (machine 1's first file), another token of h2 +Inf (machine 0's second).
POISON = [("h1", 3, 2, 5, math.nan), ("h2", 1, 0, 0, math.inf)]


@pytest.fixture
def poisoned(local: LocalStore) -> SynthRun:
    return write_synthetic_run(local, "bad", ["h1", "h2"], machines=2, files=3, nonfinite=POISON)


def aligned(s1: torch.Tensor, s2: torch.Tensor, i: torch.Tensor, p: torch.Tensor) -> Counter[bytes]:
    """Multiset of tokens as (h1 state, h2 state, id, position): a token's hooks stay together."""
    return triples(torch.cat([s1.view(torch.uint8), s2.view(torch.uint8)], 1), i, p)


def test_drop_nonfinite_delivers_exactly_the_finite_tokens_with_hooks_aligned(
    poisoned: SynthRun, tmp_path: Path
) -> None:
    s1, s2 = (poisoned.tensor(h).reshape(-1, 8) for h in ("h1", "h2"))
    i, p = (poisoned.tensor("h1", k).reshape(-1) for k in ("input_ids", "positions"))
    finite = torch.isfinite(s1).all(1) & torch.isfinite(s2).all(1)
    keep = (p >= 0) & finite
    assert int(((p >= 0) & ~finite).sum()) == 2  # the two bad tokens are real tokens
    opts = dict(hooks=["h1", "h2"], batch_tokens=25, window=2, return_ids=True, drop_last=False)
    loader = TokenLoader(tmp_path / "bad", drop_nonfinite=True, **opts)
    batches = list(loader)
    assert all(torch.isfinite(b["states"][h]).all() for b in batches for h in ("h1", "h2"))
    got = sum(
        (aligned(b["states"]["h1"], b["states"]["h2"], b["input_ids"], b["positions"]) for b in batches), Counter()
    )
    assert got == aligned(s1[keep], s2[keep], i[keep], p[keep]) and sum(got.values()) == int(keep.sum())
    assert loader.nonfinite_dropped == 2
    # Without it the two tokens are delivered as stored, in both hooks.
    every = list(TokenLoader(tmp_path / "bad", **opts))
    assert sum(int((~torch.isfinite(b["states"][h])).any(1).sum()) for b in every for h in ("h1", "h2")) == 2
    # A resume must drop the same tokens: a state of the other setting is refused.
    state = TokenLoader(tmp_path / "bad", **opts).state_dict()
    with pytest.raises(ConfigError, match="saved with drop_nonfinite=False, this loader has True"):
        TokenLoader(tmp_path / "bad", drop_nonfinite=True, **opts).load_state_dict(state)


def test_one_bad_token_leaves_the_other_tokens_normalised(
    poisoned: SynthRun, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The statistics leave the bad tokens out: centring delivers them (only them) as NaN or Inf,
    # and with drop_nonfinite every token is finite and centred on the statistics' exact mean.
    opts = dict(hooks=["h1", "h2"], batch_tokens=25, center=True, norm_target=8**0.5, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="activault.reading"):
        batches = list(TokenLoader(tmp_path / "bad", **opts))
    assert "1 token(s) with NaN or Inf are left out of the statistics but still delivered" in caplog.text
    bad = [int((~torch.isfinite(b[h])).any(1).sum()) for b in batches for h in ("h1", "h2")]
    assert sum(bad) == 2 and sum(n > 0 for n in bad) <= 2
    dropped = TokenLoader(tmp_path / "bad", drop_nonfinite=True, **opts)
    out = {h: torch.cat([b[h] for b in dropped]) for h in ("h1", "h2")}
    s = {h: poisoned.tensor(h).reshape(-1, 8) for h in ("h1", "h2")}
    keep = (poisoned.tensor("h1", "positions").reshape(-1) >= 0) & torch.isfinite(s["h1"] + s["h2"]).all(1)
    for h, x in out.items():
        # Centred and scaled with the statistics of every finite token of h (float64, exact).
        finite = s[h][(poisoned.tensor(h, "positions").reshape(-1) >= 0) & torch.isfinite(s[h]).all(1)].double()
        mean, var = finite.mean(0), finite.var(0, unbiased=False)
        want = (s[h][keep].double() - mean) * (8**0.5 / var.sum().sqrt())
        assert torch.isfinite(x).all() and x.shape == want.shape
        assert torch.allclose(x.double().sort(0).values, want.sort(0).values, atol=1e-5)


def test_statistics_that_counted_nan_in_are_refused_for_normalising(poisoned: SynthRun, tmp_path: Path) -> None:
    as_stats_version_1(LocalStore(tmp_path, fsync=False), "bad")  # as written before stats_version 2
    for uri, hooks in ((tmp_path / "bad", ["h1", "h2"]), (tmp_path / "bad/h1", None)):
        for norm in (dict(center=True), dict(norm_target=1.0)):
            with pytest.raises(DataError) as e:
                TokenLoader(uri, hooks=hooks, batch_tokens=8, **norm)
            msg = str(e.value)
            for part in (f"hook 'h1' of run {tmp_path / 'bad'}", "1 token(s) with NaN or Inf", "merge-stats RUN"):
                assert part in msg, msg
            assert "drop_nonfinite=True" in msg
    assert len(list(TokenLoader(tmp_path / "bad/h1", batch_tokens=8))) > 0  # not normalising: read as stored
    merge_run_statistics(str(tmp_path / "bad"))  # the fix the message names
    x = torch.cat(list(TokenLoader(tmp_path / "bad/h1", batch_tokens=8, center=True, drop_nonfinite=True)))
    assert torch.isfinite(x).all()


def test_megabatch_readers_refuse_drop_nonfinite(run: SynthRun, tmp_path: Path) -> None:
    # RCache yields whole megabatches: dropping tokens would change their shape, so it is refused.
    for make in (
        lambda: RCache(tmp_path / "run/h1", drop_nonfinite=True),
        lambda: RCache(tmp_path / "run/h1", options=ReadOptions(drop_nonfinite=True)),
        lambda: ActivationDataset(tmp_path / "run/h1", drop_nonfinite=True),
    ):
        with pytest.raises(ConfigError, match="drop_nonfinite=True is not accepted.*TokenLoader"):
            make()
    with pytest.raises(ConfigError, match="drop_nonfinite='yes' is not accepted: drop_nonfinite must be True or False"):
        ReadOptions(drop_nonfinite="yes")  # type: ignore[arg-type]
    ds = ActivationDataset(tmp_path / "run/h1", batch_tokens=8, drop_nonfinite=True)
    assert sum(b.shape[0] for b in ds) == 8 * (sum(tokens(run, "h1").values()) // 8)


# ---- the ramp: the first batch after one file ----


def test_the_first_batch_is_yielded_once_one_file_is_loaded(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = dict(batch_tokens=20, window=4, seed=1, return_ids=True)
    loader = TokenLoader(tmp_path / "run/h1", **opts)
    gate, loaded = threading.Event(), []
    load = loader.files.load

    def gated(f: Any, epoch: int, seq: int, *args: Any) -> Any:
        if seq > 0:  # later files wait until the first batch is out (bounded: a loader that waits
            gate.wait(30)  # for a whole window gets them late, and the assertion below says so)
        item = load(f, epoch, seq, *args)
        loaded.append(seq)
        return item

    monkeypatch.setattr(loader.files, "load", gated)
    it = iter(loader)
    try:
        first = next(it)
        assert loaded == [0], f"files loaded when the first batch came: {loaded}"
    finally:
        gate.set()
    got = [first, *it]
    assert flat_tokens(got) == flat_tokens(list(TokenLoader(tmp_path / "run/h1", **opts)))


def file_of(run: SynthRun, hook: str) -> dict[bytes, int]:
    """Each stored token, as flat_tokens writes it, -> its file's index in name order."""
    out = {}
    for k, name in enumerate(run.names):
        f = run.files[hook][name]
        batch = {"states": f["states"].reshape(-1, 8), "input_ids": f["input_ids"].reshape(-1).long()}
        batch["positions"] = f["positions"].reshape(-1)
        out.update(dict.fromkeys(flat_tokens([batch]), k))
    return out


def test_the_ramp_is_seeded_sharded_and_resumes_exactly(run: SynthRun, tmp_path: Path) -> None:
    # window 4: windows of 4, then 2 files (of 6); the first drawn as its files arrive, 16 tokens a
    # file (max(tokens // window, batch_tokens)): one batch from the first file alone, one from two...
    opts = dict(batch_tokens=16, window=4, seed=11, return_ids=True, drop_positions_below=1)
    full = list(TokenLoader(tmp_path / "run/h1", **opts))
    assert flat_tokens(full) == flat_tokens(list(TokenLoader(tmp_path / "run/h1", **opts)))  # seeded
    assert flat_tokens(full) != flat_tokens(list(TokenLoader(tmp_path / "run/h1", **{**opts, "seed": 12})))
    # The shuffle-quality cost: the first batch is from one file (every pair: 1.0), the next from
    # two, then three; full windows mix (an ideal shuffle of 6 files: about 1/6).
    where = file_of(run, "h1")
    quality = [same_source_pairs(np.array([where[t] for t in flat_tokens([b])])) for b in full]
    files = [{where[t] for t in flat_tokens([b])} for b in full]
    assert [len(f) for f in files[:3]] == [1, 2, 3] and files[0] < files[1] < files[2] and quality[0] == 1.0
    assert max(quality[-4:]) < 1.0 and np.mean(quality[-4:]) < 0.6
    for k in range(1, len(full)):  # resumed after every batch, the ramp's included
        first = TokenLoader(tmp_path / "run/h1", **opts)
        with first:
            for j, _ in enumerate(first):
                if j + 1 == k:
                    break
            state = first.state_dict()
        again = TokenLoader(tmp_path / "run/h1", **opts)
        again.load_state_dict(state)
        assert flat_tokens(list(again)) == flat_tokens(full[k:]), k
    # Ranks: disjoint shares that together hold every token, each with its own ramp.
    shares = [
        flat_tokens(list(TokenLoader(tmp_path / "run/h1", rank=r, world_size=2, drop_last=False, **opts)))
        for r in (0, 1)
    ]
    assert not set(shares[0]) & set(shares[1])
    assert Counter(shares[0] + shares[1]) == Counter(
        flat_tokens(list(TokenLoader(tmp_path / "run/h1", **{**opts, "drop_last": False})))
    )


# ---- the gather reads the fetched buffers; compressed bytes are let go of ----


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def copying_run(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | Store, dict[str, Any], SynthRun]:
    """(where the run is, its store options, the run): local files read into buffers (not mapped),
    or on moto."""
    if request.param == "local":
        run = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3)
        return str(tmp_path / "r/h"), {"map_reads": False}, run
    store = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=s3_env(request.getfixturevalue("moto_url")))
    run = write_synthetic_run(store, "r", ["h"], files=3)
    return S3Store(f"{store.url('r/h')}", env=s3_env(request.getfixturevalue("moto_url"))), {}, run


def test_the_gather_reads_the_fetched_buffers(
    copying_run: tuple[str | Store, dict[str, Any], SynthRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, store_options, run = copying_run
    loader = TokenLoader(uri, batch_tokens=20, window=2, drop_last=False, return_ids=True, store_options=store_options)
    fetched: list[tuple[int, int]] = []  # (address, bytes) of every buffer the reads filled
    bytes_, take = loader.files.buffers.bytes, window_module.take_rows

    def recorded(nbytes: int) -> torch.Tensor:
        t = bytes_(nbytes)
        fetched.append((t.data_ptr(), nbytes))
        return t

    sources: list[tuple[int, int]] = []

    def spy(takes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], workers: Any) -> None:
        sources.extend((src.ctypes.data, src.nbytes) for src, _, _ in takes)
        take(takes, workers)

    monkeypatch.setattr(loader.files.buffers, "bytes", recorded)
    monkeypatch.setattr(window_module, "take_rows", spy)
    batches = list(loader)
    assert sources and all(any(a <= p and p + n <= a + m for a, m in fetched) for p, n in sources), (
        "the gather read from memory the reads did not fill: a copy in between"
    )
    got = sum((triples(b["states"], b["input_ids"], b["positions"]) for b in batches), Counter())
    assert got == tokens(run, "h")


def write_compressed_run(store: LocalStore, run: str, files: int) -> SynthRun:
    """A one-hook run of zstd-compressed files (and the tensors it stores)."""
    meta = records.hook_metadata(
        run_name=run, hook="h", d_model=8, dtype=torch.bfloat16, seq_length=16, rows_per_file=4,
        batch_size=4, batches_per_upload=1, model="synthetic",
    )  # fmt: skip
    writer = RunWriter(
        store, records.RunRecord(run_name=run, hooks=["h"], num_runs=1), {"h": meta}, codec=codecs.from_config("zstd")
    )
    writer.join()
    out = SynthRun(run, ["h"], [], {"h": {}})
    g = torch.Generator().manual_seed(3)
    stats = {"h": RunningStats(8)}
    for k in range(files):
        states = torch.randn(4, 16, 8, generator=g).to(torch.bfloat16)
        ids = torch.randint(0, 1000, (4, 16), generator=g, dtype=torch.int32)
        pos = torch.arange(16, dtype=torch.int32).expand(4, 16).contiguous()
        stats["h"].update(states.reshape(-1, 8))
        writer.write_file({"h": states}, ids, pos, tokens=64, data_state={}, stats=stats)
        name = records.file_name(0, k)
        out.names.append(name)
        out.files["h"][name] = {"states": states, "input_ids": ids, "positions": pos}
    writer.finish({}, stats)
    return out


def test_held_compressed_files_keep_their_decoded_states_alone(tmp_path: Path) -> None:
    run = write_compressed_run(LocalStore(tmp_path, fsync=False), "z", files=3)
    loader = TokenLoader(tmp_path / "z/h", batch_tokens=20, drop_last=False, return_ids=True)
    with loader.files.prefetch(0) as files:
        for _, item in files:  # ids and positions no longer views of the compressed bytes
            assert item.input_ids.untyped_storage().data_ptr() != item.states[0].untyped_storage().data_ptr()
            assert item.input_ids.untyped_storage().nbytes() == 64 * 4  # their own memory, nothing more
    got = sum((triples(b["states"], b["input_ids"], b["positions"]) for b in loader), Counter())
    assert got == tokens(run, "h")
    plain = write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=1)
    plain_loader = TokenLoader(tmp_path / "r/h", batch_tokens=20)  # held: its stream holds it weakly
    with plain_loader.files.prefetch(0) as files:
        for _, item in files:  # stored raw: still views of the one fetched buffer, no copy
            assert item.input_ids.untyped_storage().data_ptr() == item.states[0].untyped_storage().data_ptr()
    assert plain.names


# ---- return_index: each token's coordinates, for `activault context` ----


def test_the_index_names_each_tokens_stored_coordinates(tmp_path: Path) -> None:
    run = write_synthetic_run(LocalStore(tmp_path), "r", ["h1", "h2"], machines=2, documents=True)
    loader = TokenLoader(
        tmp_path / "r", hooks=["h1", "h2"], batch_tokens=24, return_ids=True, return_index=True, drop_last=False
    )
    seen = set()
    for b in loader:
        assert b["index"].shape == (b["input_ids"].shape[0], 3) and b["index"].dtype == torch.int64
        for k, (f, r, c) in enumerate(b["index"].tolist()):
            uri, name = loader.indexed_file(f)
            stored = run.files["h2"][name]
            assert uri == str(tmp_path / "r") and (name, r, c) not in seen
            assert torch.equal(b["states"]["h2"][k], stored["states"][r, c])
            assert b["input_ids"][k] == stored["input_ids"][r, c] and b["positions"][k] == stored["positions"][r, c]
            seen.add((name, r, c))
    assert len(seen) == sum(int((run.files["h1"][n]["positions"] >= 0).sum()) for n in run.names)
    with pytest.raises(ConfigError, match="file 99 is not an index of this loader's files"):
        loader.indexed_file(99)
    only = next(iter(TokenLoader(tmp_path / "r/h1", batch_tokens=4, return_index=True)))
    assert set(only) == {"states", "index"}  # a hook folder's URI: its run is the folder above
    assert TokenLoader(tmp_path / "r/h1", batch_tokens=4).indexed_file(0)[0] == str(tmp_path / "r")


def test_indexed_tokens_come_back_through_token_context(tiny_model_dir, tmp_path: Path) -> None:
    cfg = make_cfg(tiny_model_dir("llama"), tmp_path / "vault", data={"n_batches": 4})
    collect(cfg, show_progress=False)
    hook = cfg.upload_config.hooks[0]
    loader = TokenLoader(tmp_path / "vault/run", hooks=[hook], batch_tokens=64, return_ids=True, return_index=True)
    batch = next(iter(loader))
    for k in random.Random(0).sample(range(64), 8):
        f, r, c = batch["index"][k].tolist()
        run_uri, name = loader.indexed_file(f)
        ctx = token_context(run_uri, hook, name, r, c, window=4)
        assert ctx.token_id == int(batch["input_ids"][k]) and ctx.position == int(batch["positions"][k])
        assert f"[[{ctx.token}]]" in ctx.text()


def test_a_resume_inside_the_first_windows_stages_continues_exactly(run: SynthRun, tmp_path: Path) -> None:
    # 10-token batches, window 4 of 6 files (~60 kept tokens a file): the first window's stages draw
    # 15 tokens at each of its first three files, so batches straddle the stages and the window.
    opts = dict(batch_tokens=10, window=4, seed=2, return_ids=True, drop_positions_below=1, drop_last=False)
    full = list(TokenLoader(tmp_path / "run/h1", **opts))
    for k in range(1, 12):  # every resume point through the stages and into the complete window
        first = TokenLoader(tmp_path / "run/h1", **opts)
        with first:
            for j, _ in enumerate(first):
                if j + 1 == k:
                    break
            state = first.state_dict()
        assert state["ramp"] == "first-window"
        again = TokenLoader(tmp_path / "run/h1", **opts)
        again.load_state_dict(state)
        assert flat_tokens(list(again)) == flat_tokens(full[k:]), k
    assert Counter(flat_tokens(full)) == Counter(
        flat_tokens(list(TokenLoader(tmp_path / "run/h1", ramp=False, **opts)))
    )


def test_a_consumer_holding_one_batch_gets_one_batch_buffer_faulted_in_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_synthetic_run(LocalStore(tmp_path, fsync=False), "r", ["h"], files=3, rows=8, d=64)
    monkeypatch.setattr(buffers_module, "PREFAULT_BYTES", 4096)  # a batch: 32 tokens x 64 x 2 bytes
    warmed: list[int] = []
    warm, take = ReadBuffers._warm, ReadBuffers.bytes

    def counted(pool: ReadBuffers, nbytes: int) -> None:
        warmed.append(nbytes)
        warm(pool, nbytes)

    def settled(pool: ReadBuffers, nbytes: int) -> torch.Tensor:
        got = take(pool, nbytes)
        pool.settle()  # each pre-fault done before the next request: the count does not race
        return got

    monkeypatch.setattr(ReadBuffers, "_warm", counted)
    monkeypatch.setattr(ReadBuffers, "bytes", settled)
    batches = 0
    for batch in TokenLoader(tmp_path / "r/h", batch_tokens=32, window=2):
        held = batch  # held while the next one is gathered, as a training step does  # noqa: F841
        batches += 1
    # The second batch's buffer, faulted in ahead; then the two are reused: never a third, which
    # took the cores from the gather and the consumer (docs/benchmarks.md, third session).
    assert batches > 3 and warmed == [32 * 64 * 2]
