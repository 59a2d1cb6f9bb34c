"""activault.integrations: SAELens providers and scaling, sparsify replay, dictionary_learning buffer,
SAELens cache export/import. Each library is imported for real: these tests need the
`integrations` extra installed."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from activault import TokenLoader
from activault.errors import ActivaultError, ConfigError, FormatError, NotFoundError
from activault.integrations import shared as v
from activault.integrations.dictionary_learning import VaultBuffer
from activault.integrations.saelens import (
    VaultProvider,
    scaling_factor,
    set_scaling_factor,
)
from activault.integrations.saelens_cache import add_subcommands, export_saelens, import_saelens
from activault.integrations.sparsify import replay
from activault.storage import LocalStore
from activault.tools.verify import verify_run
from activault.vault import records
from activault.vault import writer as run_writer
from activault.vault.megabatch import FORMAT_VERSION
from support.synth import SynthRun

HOOKS = ["h1", "h2"]


def kept(run: SynthRun, hook: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every non-padding token of a synthetic run's hook, `[tokens, d]`, in file order."""
    s = run.tensor(hook)
    return s.reshape(-1, s.shape[-1])[run.tensor(hook, "positions").reshape(-1) >= 0].to(dtype)


def row_counter(x: torch.Tensor) -> Counter[bytes]:
    return Counter(bytes(r.numpy().tobytes()) for r in x.contiguous())


def epochs_of(provider: VaultProvider, n: int) -> list[tuple[int, torch.Tensor]]:
    """n batches, each with the epoch it belongs to (the loader counts an epoch once the next starts)."""
    out = []
    for _ in range(n):
        batch = next(provider)
        out.append((provider.loader.epoch, batch))
    return out


# ---- SAELens provider --------------------------------------------------------------------------


def test_provider_is_endless_and_reshuffles_each_epoch(run: SynthRun, tmp_path: Path) -> None:
    # 2 machines x 3 files x 64 tokens, 3 padding per machine: 378 kept = 14 batches of 27.
    with VaultProvider(tmp_path / "run", "h1", batch_tokens=27, window=2) as provider:
        got = epochs_of(provider, 14 * 3 + 2)
    assert [e for e, _ in got] == [0] * 14 + [1] * 14 + [2] * 14 + [3] * 2
    want = row_counter(kept(run, "h1"))
    per_epoch = [torch.cat([b for e, b in got if e == k]) for k in range(3)]
    for x in per_epoch:
        assert x.dtype == torch.float32 and row_counter(x) == want  # every kept token once per epoch
    assert not torch.equal(per_epoch[0], per_epoch[1])  # a new order each epoch


@pytest.mark.parametrize("stop_after", [3, 14, 20])  # mid-epoch, at the end of an epoch, in the next
def test_provider_resumes_exactly(run: SynthRun, tmp_path: Path, stop_after: int) -> None:
    opts = dict(batch_tokens=27, window=2, seed=3)
    with VaultProvider(tmp_path / "run", HOOKS, **opts) as full:
        stream = [next(full) for _ in range(34)]
    with VaultProvider(tmp_path / "run", HOOKS, **opts) as first:
        for _ in range(stop_after):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    with VaultProvider(tmp_path / "run", HOOKS, **opts) as again:
        again.load_state_dict(state)
        for want in stream[stop_after:]:
            got = next(again)
            assert all(torch.equal(got[h], want[h]) for h in HOOKS)


def test_provider_ranks_read_disjoint_files_that_cover_the_run(run: SynthRun, tmp_path: Path) -> None:
    seen = []
    for rank in range(2):
        # 3 files of 64 tokens per rank, minus 3 padding per machine: 3 divides every rank's count,
        # so no batch straddles two epochs.
        with VaultProvider(tmp_path / "run", "h1", batch_tokens=3, rank=rank, world_size=2) as p:
            got = epochs_of(p, 70)
        seen.append(torch.cat([b for e, b in got if e == 0]))
    assert not set(row_counter(seen[0])) & set(row_counter(seen[1]))
    assert row_counter(torch.cat(seen)) == row_counter(kept(run, "h1"))
    with pytest.raises(ConfigError, match="world_size"):
        next(VaultProvider(tmp_path / "run", "h1", batch_tokens=16, rank=7, world_size=8))


def test_options_are_checked_once_and_travel_as_one_value(run: SynthRun, tmp_path: Path) -> None:
    """Each integration checks its loader's options when it is made: a mistyped one is named with what
    it accepts (the integration's own arguments and TokenLoader's); `options=ReadOptions(...)` passes
    through, its rank and world_size too unless the integration is given its own."""
    root = tmp_path / "run"
    for make, owner, typo in (
        (lambda: VaultProvider(root, "h1", batch_tokens=8, windw=2), "VaultProvider", "window"),
        (lambda: VaultProvider(root, "h1", batch_tokens=8, loop=False), "VaultProvider", "None"),
        (lambda: VaultBuffer(root, "h1", out_batch_size=8, bufer_size=3), "VaultBuffer", "buffer_size"),
        (lambda: replay(root, ["h1"], num_tokens=64, tokens_per_row=8, sed=1), "replay", "seed"),
    ):
        with pytest.raises(ConfigError, match=f"^{owner} has no option") as e:
            make()
        assert (f"did you mean {typo!r}" in str(e.value)) == (typo != "None")
        assert "drop_positions_below" in str(e.value) and "verify_checksums" in str(e.value)
    for make, message in (
        (lambda: VaultBuffer(root, "h1", out_batch_size=0), "out_batch_size=0 is not accepted"),
        (lambda: replay(root, ["h1"], num_tokens=64, tokens_per_row=2.5), "tokens_per_row=2.5 is not accepted"),
        (lambda: replay(root, ["h1"], num_tokens=4, tokens_per_row=8), "num_tokens=4 is not accepted"),
        (lambda: VaultProvider(root, "h1", batch_tokens=8, buffer_size=0), "buffer_size=0 is not accepted"),
        (lambda: VaultProvider(root, "h1", batch_tokens=8, store_options={"fsnyc": 1}), "'fsnyc'"),
    ):
        with pytest.raises(ConfigError, match=message):
            make()
    shard = v.ReadOptions(rank=1, world_size=2, seed=3, buffer_size=1)
    with VaultProvider(root, "h1", batch_tokens=8, options=shard) as p:
        assert (p.rank, p.world_size, p.loader.rank, p.loader.seed, p.loader.files.buffer_size) == (1, 2, 1, 3, 1)
    with VaultProvider(root, "h1", batch_tokens=8, options=shard, rank=0, world_size=1, seed=4) as p:
        assert (p.rank, p.world_size, p.loader.seed) == (0, 1, 4)  # its own arguments and keywords win
    model, dataset = replay(root, ["h1"], num_tokens=64, tokens_per_row=8, options=shard)
    assert dataset.loader.rank == 1 and dataset.loader.world_size == 2
    dataset.close()


def test_provider_shapes_for_transcoders_and_crosscoders(run: SynthRun, tmp_path: Path) -> None:
    root = tmp_path / "run"
    with (
        VaultProvider(root, {"t": ("h1", "h2")}, batch_tokens=32, seed=1) as pairs,
        VaultProvider(root, HOOKS, batch_tokens=32, seed=1, concat=True) as cat,
        VaultProvider(root, HOOKS, batch_tokens=32, seed=1) as both,
    ):
        x, y = next(pairs)["t"]
        joined, d = next(cat), next(both)
    assert torch.equal(x, d["h1"]) and torch.equal(y, d["h2"])  # the same tokens, aligned
    assert torch.equal(joined, torch.cat([d["h1"], d["h2"]], dim=1)) and joined.shape == (32, 16)
    with pytest.raises(ConfigError, match="input_hook, output_hook"):
        VaultProvider(root, {"t": ("h1",)}, batch_tokens=32)  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="concat"):
        VaultProvider(root, "h1", batch_tokens=32, concat=True)
    with pytest.raises(NotFoundError):
        VaultProvider(root, "nope", batch_tokens=32)


def test_scaling_factor_is_exact_and_set_on_trainers(run: SynthRun, tmp_path: Path) -> None:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    root = tmp_path / "run"
    for h in HOOKS:  # float64 recomputation over every stored token of both machines
        want = math.sqrt(8) / kept(run, h, torch.float64).norm(dim=1).mean().item()
        assert scaling_factor(root, h) == pytest.approx(want, rel=1e-12)
    cfg = SAETrainerConfig(
        total_training_samples=5 * 32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3, n_batches_for_norm_estimate=50
    )

    def sae(d: int = 8) -> TopKTrainingSAE:
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d, d_sae=32, k=2, normalize_activations="expected_average_only_in")
        )

    with VaultProvider(root, "h2", batch_tokens=32) as provider:
        trainer = SAETrainer(cfg=cfg, sae=sae(), data_provider=provider)
        set_scaling_factor(trainer, provider)
        assert trainer.activation_scaler.scaling_factor == scaling_factor(root, "h2")
        trainer.fit()
        assert provider.batches == 5  # no estimation pass (it would have taken 50 batches)
        with pytest.raises(ConfigError, match="d_in=4"):
            set_scaling_factor(SAETrainer(cfg=cfg, sae=sae(4), data_provider=provider), root, "h2")
    with VaultProvider(root, HOOKS, batch_tokens=32) as provider:
        multi = MultiSAETrainer(
            cfg=cfg, saes={"a": sae(), "b": sae()}, hook_names={"a": "h1", "b": "h2"}, data_provider=provider
        )
        set_scaling_factor(multi, root)
        assert [t.activation_scaler.scaling_factor for t in multi.trainers.values()] == [
            scaling_factor(root, "h1"),
            scaling_factor(root, "h2"),
        ]


def test_saelens_checkpoints_hold_the_provider_position(run: SynthRun, tmp_path: Path) -> None:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    root = tmp_path / "run"
    cfg = SAETrainerConfig(
        total_training_samples=9 * 16,
        train_batch_size_samples=16,
        lr=1e-3,
        lr_end=1e-3,
        n_checkpoints=2,
        checkpoint_path=str(tmp_path / "ckpt"),
    )
    with VaultProvider(root, "h1", batch_tokens=16, seed=2) as provider:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
        SAETrainer(cfg=cfg, sae=sae, data_provider=provider, save_checkpoint_fn=provider.save_to).fit()
    with VaultProvider(root, "h1", batch_tokens=16, seed=2) as reference:
        stream = [next(reference) for _ in range(12)]
    checkpoints = sorted((tmp_path / "ckpt").iterdir(), key=lambda p: int(p.name))
    assert [int(p.name) for p in checkpoints] == [64, 112]  # SAELens names them by samples seen
    for ckpt in checkpoints:
        with VaultProvider(root, "h1", batch_tokens=16, seed=2) as again:
            again.load_from(ckpt)
            assert torch.equal(next(again), stream[int(ckpt.name) // 16])  # the batch after the checkpoint
    with pytest.raises(NotFoundError, match="save_checkpoint_fn"):
        VaultProvider(root, "h1", batch_tokens=16).load_from(tmp_path)


# ---- training from structured activations --------------------------------------------------------


def sparse_run(
    store: LocalStore,
    run: str = "sparse",
    tokens: int = 8192,
    d: int = 16,
    atoms: int = 32,
    k: int = 3,
) -> None:
    """A run whose tokens are k-sparse combinations of `atoms` directions: `x` in h_in, the same
    codes through another dictionary in h_out (a transcoder has something exact to learn)."""
    g = torch.Generator().manual_seed(0)
    dict_in, dict_out = torch.randn(atoms, d, generator=g), torch.randn(atoms, d, generator=g)
    codes = torch.zeros(tokens, atoms)
    idx = torch.rand(tokens, atoms, generator=g).argsort(1)[:, :k]
    codes.scatter_(1, idx, torch.rand(tokens, k, generator=g) + 0.5)
    seq, rows = 64, tokens // 64
    states = {
        "h_in": (codes @ dict_in).view(rows, seq, d),
        "h_out": (codes @ dict_out).view(rows, seq, d),
    }
    ids = torch.randint(0, 500, (rows, seq), generator=g, dtype=torch.int32)
    pos = torch.arange(seq, dtype=torch.int32).expand(rows, seq).contiguous()
    per_file = 32
    metadata = {
        h: v.hook_metadata(
            run_name=run,
            hook=h,
            d_model=d,
            dtype=torch.float32,
            seq_length=seq,
            rows_per_file=per_file,
            batch_size=per_file,
            batches_per_upload=1,
            model="synthetic",
        )
        for h in states
    }
    writer = v.RunWriter(store, v.RunRecord(run_name=run, hooks=list(states), num_runs=1), metadata)
    writer.join()
    stats = {h: v.RunningStats(d) for h in states}
    for a in range(0, rows, per_file):
        part = {h: s[a : a + per_file].contiguous() for h, s in states.items()}
        for h, x in part.items():
            stats[h].update(x.view(-1, d))
        tokens = per_file * seq
        writer.write_file(
            part, ids[a : a + per_file], pos[a : a + per_file], tokens=tokens, data_state=None, stats=stats
        )
    writer.finish(None, stats)


def dense_baselines(root: Path) -> tuple[float, float]:
    """FVU of the best dense codes the sparse ones must beat, fit and scored on every token (float64):
    PCA with k=4 components of h_in (an SAE's budget), and the least-squares affine map h_in -> h_out."""
    with TokenLoader(root, hooks=["h_in", "h_out"], batch_tokens=8192, dtype=torch.float64) as loader:
        batch = next(iter(loader))
    x, y = batch["h_in"], batch["h_out"]
    xc = x - x.mean(0)
    top = torch.linalg.svd(xc, full_matrices=False).Vh[:4]
    pca = float((xc - xc @ top.T @ top).pow(2).sum() / xc.pow(2).sum())
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    fit = xa @ torch.linalg.lstsq(xa, y).solution
    return pca, float((y - fit).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_sparsify_trains_an_sae_and_a_transcoder_from_the_vault(tmp_path: Path) -> None:
    from sparsify import SaeConfig, TrainConfig, Trainer, TranscoderConfig

    sparse_run(LocalStore(tmp_path, fsync=False))
    pca_fvu, linear_fvu = dense_baselines(tmp_path / "sparse")
    cases = (
        (["h_in"], SaeConfig(k=4, num_latents=64), 5e-3, pca_fvu),
        ({"mlp": ("h_in", "h_out")}, TranscoderConfig(k=4, num_latents=64), 2e-2, linear_fvu),
    )
    for points, coder_cfg, lr, floor in cases:
        model, dataset = replay(tmp_path / "sparse", points, num_tokens=60 * 8 * 32, tokens_per_row=32)
        cfg = TrainConfig(
            coder_cfg,
            batch_size=8,
            hookpoints=model.hookpoints,
            optimizer="adam",
            lr=lr,
            lr_warmup_steps=5,
            log_to_wandb=False,
            save_dir=str(tmp_path / "ckpt"),
            save_every=10**9,
        )
        trainer = Trainer(cfg, dataset, model)
        fvu: list[float] = []
        coder = next(iter(trainer.saes.values()))
        coder.register_forward_hook(lambda _m, _i, out, fvu=fvu: fvu.append(float(out.fvu.detach())))
        trainer.fit()
        dataset.close()
        assert len(fvu) == 60 and dataset.position == 60 * 8
        # From ~1 (biases at the mean) to below the best dense code of the same budget, in 60 steps:
        # the data is exactly 3-sparse, which only a sparse code can exploit.
        assert sum(fvu[-5:]) / 5 < floor < fvu[0], (floor, fvu)


def test_sparsify_dataset_resumes_by_state_or_by_reading_forward(tmp_path: Path) -> None:
    sparse_run(LocalStore(tmp_path, fsync=False))

    def make():
        return replay(tmp_path / "sparse", ["h_in"], num_tokens=50 * 32, tokens_per_row=32, rows_per_read=3)  # noqa: E731

    model, full = make()
    want = [full[i]["input_ids"] for i in range(50)]
    model, first = make()
    for i in range(17):
        first[i]
    state = first.state_dict()
    model, again = make()
    again.load_state_dict(state)
    assert again.state_dict() == state  # saved again before reading: the same position
    assert all(torch.equal(again[i]["input_ids"], want[i]) for i in range(17, 50))
    model, forward = make()
    rest = forward.select(range(17, 50))  # what sparsify calls when resuming at step 17 // batch_size
    assert len(rest) == 33 and all(torch.equal(rest[j]["input_ids"], want[17 + j]) for j in range(33))
    seen: list[torch.Tensor] = []
    model.get_submodule("h_in").register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    ids = torch.stack([want[17], want[18]])
    model(ids)  # what sparsify's Trainer does with a batch of the rows handed out
    with TokenLoader(tmp_path / "sparse", hooks=["h_in"], batch_tokens=8192, return_ids=True) as loader:
        batch = next(iter(loader))
    stored = {(int(i), s.numpy().tobytes()) for i, s in zip(batch["input_ids"], batch["states"]["h_in"], strict=True)}
    assert seen[0].shape == (2, 32, 16)
    assert all(
        (int(i), s.numpy().tobytes()) in stored for i, s in zip(ids.reshape(-1), seen[0].reshape(-1, 16), strict=True)
    )
    with pytest.raises(ActivaultError, match="not the ones"):
        model(ids)  # those rows were consumed: the next queued are rows 19 and 20
    with pytest.raises(ActivaultError, match="already read"):
        forward[3]
    for d in (full, first, again, forward):
        d.close()


def test_dictionary_learning_trains_from_a_vault_buffer(tmp_path: Path) -> None:
    from dictionary_learning.trainers import TopKTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.training import trainSAE

    sparse_run(LocalStore(tmp_path, fsync=False))
    with TokenLoader(tmp_path / "sparse", hooks=["h_in"], batch_tokens=8192) as loader:
        every = next(iter(loader))["h_in"]  # all 8192 tokens
    buffer = VaultBuffer(tmp_path / "sparse", "h_in", out_batch_size=256, normalize=True, seed=0)
    assert buffer.norm_factor == pytest.approx(every.double().pow(2).sum(1).mean().sqrt().item(), rel=1e-9)
    assert next(buffer).double().pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=0.15)
    steps = 80
    cfg = {
        "trainer": TopKTrainer,
        "steps": steps,
        "activation_dim": 16,
        "dict_size": 64,
        "k": 4,
        "layer": 0,
        "lm_name": "synthetic",
        "device": "cpu",
        "warmup_steps": 5,
        "seed": 0,
        "lr": 5e-3,
    }
    trainSAE(data=buffer, trainer_configs=[cfg], steps=steps, device="cpu", save_dir=str(tmp_path / "dl"))
    assert buffer.loader.state_dict()["epoch"] >= 2  # 80 x 256 tokens: the 8192-token run twice and more
    buffer.close()
    ae = AutoEncoderTopK(16, 64, 4)
    ae.load_state_dict(torch.load(tmp_path / "dl/trainer_0/ae.pt", weights_only=True))
    xs = every / buffer.norm_factor
    with torch.no_grad():
        ev = 1 - (xs - ae(xs)).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    assert ev > 0.7, float(ev)  # k-sparse data, k=4 >= 3 true atoms: a trained TopK explains most of it


# ---- SAELens cache export / import -------------------------------------------------------------


def rows_of(root: Path, hooks: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every stored row of a run in file order: ({hook: [rows, seq, d]}, ids [rows, seq], positions)."""
    from activault import RCache

    with RCache(str(root), hooks=hooks, return_ids=True) as cache:
        items = list(cache)
    states = {h: torch.cat([i["states"][h] for i in items]) for h in hooks}
    return (
        states,
        torch.cat([i["input_ids"] for i in items]),
        torch.cat([i["positions"] for i in items]),
    )


def saelens_cache(out: Path, hook: str, acts: torch.Tensor, ids: torch.Tensor, shards: int = 2) -> Path:
    """A cache written by SAELens's own code: `CacheActivationsRunner._create_shard` per shard,
    `save_to_disk(num_shards=1)`, then its `_consolidate_shards` (no model needed for these steps)."""
    from types import SimpleNamespace

    from datasets import Array2D, Features, Sequence, Value
    from sae_lens.cache_activations_runner import CacheActivationsRunner

    rows, seq, d = acts.shape
    per = rows // shards
    features = Features(
        {hook: Array2D(shape=(seq, d), dtype="float32"), "token_ids": Sequence(Value(dtype="int32"), length=seq)}
    )
    runner = SimpleNamespace(
        cfg=SimpleNamespace(hook_name=hook, n_seq_in_buffer=per, d_in=d), context_size=seq, features=features
    )
    tmp = out / ".tmp_shards"
    tmp.mkdir(parents=True)
    for i in range(shards):
        part = slice(i * per, (i + 1) * per)
        shard = CacheActivationsRunner._create_shard(runner, (acts[part].reshape(-1, d), ids[part].reshape(-1)))  # type: ignore[arg-type]
        shard.save_to_disk(f"{tmp}/shard_{i:05d}", num_shards=1)
    CacheActivationsRunner._consolidate_shards(tmp, out, copy_files=False)
    return out


def test_round_trip_vault_cache_vault_is_bit_identical(run: SynthRun, tmp_path: Path) -> None:
    states, ids, pos = rows_of(tmp_path / "run", HOOKS)
    full = (pos >= 0).all(1)
    res = export_saelens(str(tmp_path / "run"), HOOKS, tmp_path / "cache", shard_bytes=1000)
    # One row per machine ends in 3 padding tokens: both are dropped, with their 13 real tokens.
    assert (res.padding_rows_dropped, res.real_tokens_dropped) == (2, 26)
    assert res.rows == int(full.sum()) and res.arrow_files > 1
    side = json.loads((tmp_path / "cache/activault.json").read_text())
    assert side["columns"]["h1"] == {"hook": "h1", "dtype": "bfloat16"} and side["padding_rows_dropped"] == 2
    back = import_saelens(tmp_path / "cache", str(tmp_path / "vault/back"), rows_per_file=5)
    assert back.rows == res.rows and back.files == math.ceil(res.rows / 5)
    states2, ids2, pos2 = rows_of(tmp_path / "vault/back", HOOKS)
    for h in HOOKS:
        assert states2[h].dtype == torch.bfloat16 and torch.equal(states2[h], states[h][full])
    assert torch.equal(ids2, ids[full])
    assert torch.equal(pos2, torch.arange(16, dtype=torch.int32).expand_as(pos2))  # one document per row
    checked = verify_run(LocalStore("/"), str(tmp_path / "vault/back").lstrip("/"), deep=True)
    assert checked.problems == [] and checked.tokens == back.tokens
    cfg = json.loads((tmp_path / "vault/back/cfg.json").read_text())
    assert cfg["imported_from"]["documents"] == "one per row" and cfg["hooks"] == HOOKS
    back_store = LocalStore(tmp_path / "vault")  # every record the import wrote validates
    record = records.read_run(back_store, "back")
    assert record.format_version == FORMAT_VERSION and record.imported_from.rows == res.rows
    assert records.read_progress(back_store, "back", 0).finished
    assert all(
        records.read_metadata(back_store, f"back/{h}") and records.read_statistics(back_store, f"back/{h}")
        for h in HOOKS
    )
    for h in HOOKS:  # statistics equal a float64 recomputation over the imported tokens
        want = states2[h].reshape(-1, 8).double()
        got = v.run_statistics(str(tmp_path / "vault/back"), h)
        assert got.count == want.shape[0]
        assert torch.allclose(got.mean, want.mean(0), rtol=0, atol=1e-12)
        assert got.mean_norm == pytest.approx(want.norm(dim=1).mean().item(), rel=1e-12)
    # Exporting the imported run again gives the same dataset (the Arrow files split differently).
    from datasets import load_from_disk

    export_saelens(str(tmp_path / "vault/back"), HOOKS, tmp_path / "cache2")
    one, two = (load_from_disk(str(tmp_path / c)) for c in ("cache", "cache2"))
    assert one.features == two.features and one.data.table.equals(two.data.table)


def test_positions_column_keeps_document_boundaries(run: SynthRun, tmp_path: Path) -> None:
    _, ids, pos = rows_of(tmp_path / "run", ["h1"])
    export_saelens(
        str(tmp_path / "run"),
        "h1",
        tmp_path / "cache",
        positions=True,
        columns={"h1": "blocks.0.hook_resid_post"},
    )
    import_saelens(tmp_path / "cache", str(tmp_path / "vault/back"))
    _, ids2, pos2 = rows_of(tmp_path / "vault/back", ["h1"])  # the sidecar restores the hook name
    full = (pos >= 0).all(1)
    assert torch.equal(pos2, pos[full]) and torch.equal(ids2, ids[full])


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


def test_import_of_a_cache_written_by_saelens(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    acts, ids = (
        torch.randn(8, 16, 8, generator=g),
        torch.randint(0, 900, (8, 16), generator=g, dtype=torch.int32),
    )
    ref = saelens_cache(tmp_path / "ref", "blocks.2.hook_mlp_out", acts, ids)
    res = import_saelens(
        ref,
        str(tmp_path / "vault/mlp"),
        hooks={"blocks.2.hook_mlp_out": "models.layers.2.mlp.post"},
        dtype="bfloat16",
        model="gpt2",
    )
    assert (res.rows, res.tokens) == (8, 128)
    states, ids2, pos = rows_of(tmp_path / "vault/mlp", ["models.layers.2.mlp.post"])
    assert torch.equal(states["models.layers.2.mlp.post"], acts.to(torch.bfloat16)) and torch.equal(ids2, ids)
    assert torch.equal(pos, torch.arange(16, dtype=torch.int32).expand(8, 16))
    cfg = json.loads((tmp_path / "vault/mlp/cfg.json").read_text())
    assert cfg["model"]["name"] == "gpt2" and cfg["config"]["data_config"]["seq_length"] == 16
    again = import_saelens(
        ref,
        str(tmp_path / "vault/mlp"),
        hooks={"blocks.2.hook_mlp_out": "models.layers.2.mlp.post"},
        dtype="bfloat16",
        model="gpt2",
    )
    assert again.files == res.files and again.bytes_written == 0  # finished: nothing written again


def test_export_is_atomic_when_a_file_is_damaged(run: SynthRun, tmp_path: Path) -> None:
    victim = tmp_path / "run/h2" / run.names[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        export_saelens(str(tmp_path / "run"), HOOKS, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".cache*"))


def test_import_resumes_after_a_crash_to_the_same_bytes(
    run: SynthRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_saelens(str(tmp_path / "run"), HOOKS, tmp_path / "cache")
    import_saelens(tmp_path / "cache", str(tmp_path / "a/run"), rows_per_file=3)
    real, calls = run_writer.encode, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # file 2 of a hook, or file 1's last on a slow thread
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_writer, "encode", failing)
    with pytest.raises(OSError):
        import_saelens(tmp_path / "cache", str(tmp_path / "b/run"), rows_per_file=3)
    monkeypatch.setattr(run_writer, "encode", real)
    done = json.loads((tmp_path / "b/run/progress/machine-00000.json").read_text())["files_done"]
    assert done in (1, 2)  # file 1's record may or may not have landed before the failure
    res = import_saelens(tmp_path / "cache", str(tmp_path / "b/run"), rows_per_file=3)
    assert res.resumed_at_row == 3 * done

    def tree(root):
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and ".locks" not in p.parts  # the lock file names its holder
        }

    assert tree(tmp_path / "a/run") == tree(tmp_path / "b/run")  # files, records and statistics


def test_bad_inputs_say_what_to_do(run: SynthRun, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_saelens(str(tmp_path / "run"), "h1", tmp_path / "full")
    with pytest.raises(ConfigError, match="reserved"):
        export_saelens(str(tmp_path / "run"), "h1", tmp_path / "c", columns={"h1": "token_ids"})
    with pytest.raises(NotFoundError):
        export_saelens(str(tmp_path / "run"), "nope", tmp_path / "c")
    with pytest.raises(NotFoundError, match="CacheActivationsRunner"):
        import_saelens(tmp_path / "full", str(tmp_path / "v/r"))
    from datasets import Array2D, Dataset, Features

    Dataset.from_dict(
        {"h": torch.zeros(2, 4, 3)}, features=Features({"h": Array2D(shape=(4, 3), dtype="float32")})
    ).save_to_disk(str(tmp_path / "noids"))
    with pytest.raises(FormatError, match="token_ids"):
        import_saelens(tmp_path / "noids", str(tmp_path / "v/r"))
    export_saelens(str(tmp_path / "run"), "h1", tmp_path / "c")
    with pytest.raises(ConfigError, match="new run name"):
        import_saelens(tmp_path / "c", str(tmp_path / "run"))  # a collected run is never overwritten
    with pytest.raises(ConfigError, match="run_name"):
        import_saelens(tmp_path / "c", LocalStore(tmp_path / "v"))
    import_saelens(tmp_path / "c", str(tmp_path / "v/r2"), rows_per_file=2)
    with pytest.raises(ConfigError, match="other options"):
        import_saelens(tmp_path / "c", str(tmp_path / "v/r2"), rows_per_file=3)
    with pytest.raises(ConfigError, match="no activation column"):
        import_saelens(tmp_path / "c", str(tmp_path / "v/r"), hooks=["h9"])


def test_cli_subcommands(run: SynthRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="activault")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "export",
            str(tmp_path / "run"),
            str(tmp_path / "c"),
            "--hook",
            "h1",
            "--hook",
            "h2",
            "--column",
            "h1=blocks.0.hook_resid_pre",
        ]
    )
    assert args.func(args) == 0
    assert "dropped 2 rows holding padding (26 real tokens)" in capsys.readouterr().out
    args = parser.parse_args(["import", str(tmp_path / "c"), str(tmp_path / "v/back"), "--rows-per-file", "4"])
    assert args.func(args) == 0
    assert "imported 22 rows" in capsys.readouterr().out
    assert sorted(json.loads((tmp_path / "v/back/cfg.json").read_text())["hooks"]) == HOOKS


def test_abandoned_providers_exit_silently(run: SynthRun, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = f"""
from activault.integrations.saelens import VaultProvider
from activault.integrations.dictionary_learning import VaultBuffer
p = VaultProvider({str(tmp_path / "run")!r}, ["h1", "h2"], batch_tokens=8, window=1)
b = VaultBuffer({str(tmp_path / "run")!r}, "h1", out_batch_size=8)
for _ in range(3):
    next(p), next(b)
def gen():
    yield from VaultProvider({str(tmp_path / "run")!r}, "h1", batch_tokens=8)
g = gen()
next(g)
print("left mid-epoch")
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)},
    )
    assert out.returncode == 0 and out.stdout.strip() == "left mid-epoch" and out.stderr == "", out.stderr


def test_run_statistics_names_a_missing_or_damaged_record_and_its_repair(run: SynthRun, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"h9/statistics.json does not exist.*activault merge-stats"):
        v.run_statistics(tmp_path / "run", "h9")
    (tmp_path / "run/h1/statistics.json").write_text('{"count": "many"}')
    with pytest.raises(FormatError, match=r"h1/statistics.json: field 'count'.*merge-stats"):
        v.run_statistics(tmp_path / "run", "h1")
    both = v.run_statistics([tmp_path / "run", LocalStore(tmp_path / "run")], "h2")
    assert both.count == 2 * run.stats["h2"].count
