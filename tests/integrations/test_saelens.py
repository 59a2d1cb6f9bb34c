"""integrations/saelens.py: VaultProvider (endless, reshuffled each epoch, exact resume, disjoint
ranks, transcoder and crosscoder shapes, checkpoints through SAELens), the exact scaling factor set on
SAELens trainers, providers abandoned mid-epoch, and the SAE's metadata from the run, its hook named
where TransformerLens computes the same values. SAELens and TransformerLens are imported for real."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from activault.errors import ConfigError, DataError, FormatError, NotFoundError
from activault.integrations.saelens import (
    VaultProvider,
    fill_metadata,
    sae_metadata,
    scaling_factor,
    set_scaling_factor,
    transformer_lens_name,
)
from activault.storage import LocalStore
from support.integrations import HOOKS
from support.synth import SynthRun, as_stats_version_1, write_synthetic_run


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


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"loader": None}, "field 'loader' is None"),  # was: a TypeError
        ({"rank": -1}, "field 'rank' is -1"),
        ({"world_size": 0}, "field 'world_size' is 0"),
        ({"hooks": ["h2"]}, "hooks=['h2']"),
        ({"loader": {"epoch": 0}}, "not a TokenLoader state_dict"),
    ],
)
def test_a_tampered_provider_state_is_one_error_naming_the_field(
    run: SynthRun, tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    with VaultProvider(tmp_path / "run", "h1", batch_tokens=27) as provider:
        first = next(provider)
        state = provider.state_dict()
        with pytest.raises(ConfigError) as e:
            provider.load_state_dict({**state, **change})
        assert problem in str(e.value), str(e.value)
        with pytest.raises(ConfigError, match="not a mapping"):  # was: AttributeError
            provider.load_state_dict([state])  # type: ignore[arg-type]
        assert provider.state_dict() == state and not torch.equal(next(provider), first)  # reading goes on
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/activault_provider.json").write_text("{garbage")
    with VaultProvider(tmp_path / "run", "h1", batch_tokens=27) as provider:
        with pytest.raises(FormatError, match="activault_provider.json is not valid JSON"):  # was: JSONDecodeError
            provider.load_from(tmp_path / "ckpt")
        (tmp_path / "ckpt/activault_provider.json").write_text(json.dumps({**state, "rank": -1}))
        with pytest.raises(FormatError, match="activault_provider.json: VaultProvider state: field 'rank'"):
            provider.load_from(tmp_path / "ckpt")


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


def test_scaling_factor_leaves_out_tokens_with_nan_and_refuses_statistics_that_counted_them(
    local: LocalStore, tmp_path: Path
) -> None:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    poisoned = write_synthetic_run(local, "bad", HOOKS, machines=2, files=3, nonfinite=[("h1", 3, 2, 5, math.nan)])
    root = tmp_path / "bad"
    x = kept(poisoned, "h1", torch.float64)
    finite = x[torch.isfinite(x).all(1)]
    assert finite.shape[0] == x.shape[0] - 1
    assert scaling_factor(root, "h1") == pytest.approx(math.sqrt(8) / finite.norm(dim=1).mean().item(), rel=1e-12)
    with VaultProvider(root, "h1", batch_tokens=32, drop_nonfinite=True) as provider:
        batches = [next(provider) for _ in range(12)]  # one epoch of 377 tokens and more
    assert all(torch.isfinite(b).all() for b in batches)
    cfg = SAETrainerConfig(total_training_samples=32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, normalize_activations="expected_average_only_in")
    )
    with VaultProvider(root, "h1", batch_tokens=32, drop_nonfinite=True) as provider:
        trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider)
        set_scaling_factor(trainer, provider)
        assert trainer.activation_scaler.scaling_factor == scaling_factor(root, "h1")
        as_stats_version_1(local, "bad")  # statistics.json as written before stats_version 2
        for call in (lambda: scaling_factor(root, "h1"), lambda: set_scaling_factor(trainer, provider)):
            with pytest.raises(DataError) as e:
                call()
            msg = str(e.value)
            for part in (f"hook 'h1' of run {root}", "1 token(s) with NaN or Inf", "merge-stats RUN", "drop_nonfinite"):
                assert part in msg, msg
    assert scaling_factor(root, "h2") == pytest.approx(
        math.sqrt(8) / kept(poisoned, "h2", torch.float64).norm(dim=1).mean().item(), rel=1e-12
    )


@pytest.mark.parametrize(
    "hook,model_type,want",
    [
        ("models.layers.3.post", "llama", "blocks.3.hook_resid_post"),
        ("models.layers.0.pre", "gpt2", "blocks.0.hook_resid_pre"),
        ("models.layers.2.self_attn.post", "qwen2", "blocks.2.hook_attn_out"),
        ("models.layers.2.attention.post", "gpt_neox", "blocks.2.hook_attn_out"),
        ("models.layers.2.mlp.post", "mistral", "blocks.2.hook_mlp_out"),
        ("models.layers.-1.post", "llama", "blocks.5.hook_resid_post"),  # of 6 blocks
        ("models.layers.3.post", "bert", "blocks.3.hook_normalized_resid_post"),  # post-norm: after ln2
        ("models.layers.3.attention.post", "bert", None),  # BERT's attention module adds and normalises
        ("models.layers.3.mlp.post", "gemma2", None),  # TransformerLens normalises before its hook
        ("models.layers.3.mlp.pre", "llama", None),  # the normalised input: no hook holds it unprocessed
        ("models.layers.3.post", "t5", None),  # an architecture not in the table
        ("model.layers.3.mlp", "llama", None),  # a module path, not a block hook
    ],
)
def test_transformer_lens_names_where_the_values_are_the_same(hook: str, model_type: str, want: str | None) -> None:
    assert transformer_lens_name(hook, model_type, n_layers=6) == want


def _dims(c: Any) -> dict[str, Any]:
    """HookedTransformerConfig's sizes from a Llama- or BERT-style HF config."""
    return {
        "n_layers": c.num_hidden_layers,
        "d_model": c.hidden_size,
        "n_heads": c.num_attention_heads,
        "d_head": c.hidden_size // c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_ctx": c.max_position_embeddings,
        "d_vocab": c.vocab_size,
        "act_fn": c.hidden_act,
    }


def _hooked_transformer(model: Any, arch: str) -> Any:
    """TransformerLens's HookedTransformer of a tiny HF model, its weights converted unprocessed (as
    SAELens loads a model for cached activations), built offline from the model's own config."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    c = model.config
    if arch == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer,
            d_model=c.n_embd,
            n_heads=c.n_head,
            d_head=c.n_embd // c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd,
            n_ctx=c.n_positions,
            d_vocab=c.vocab_size,
            act_fn=c.activation_function,
            normalization_type="LN",
            eps=c.layer_norm_epsilon,
            original_architecture="GPT2LMHeadModel",
        )
        weights = convert_gpt2_weights(model, cfg)
    else:
        dims = _dims(c)
        cfg = HookedTransformerConfig(
            **dims,
            normalization_type="RMS",
            eps=c.rms_norm_eps,
            positional_embedding_type="rotary",
            rotary_dim=dims["d_head"],
            rotary_base=c.rope_parameters["rope_theta"],
            gated_mlp=True,
            final_rms=True,
            n_key_value_heads=c.num_key_value_heads,
            original_architecture="LlamaForCausalLM",
        )
        weights = convert_llama_weights(model, cfg)
    tl = HookedTransformer(cfg)
    missing = tl.load_state_dict(weights, strict=False).missing_keys
    # Only buffers TransformerLens computes itself (and gpt2's unembedding bias, which HF has not).
    assert {k.rsplit(".", 1)[-1] for k in missing} <= {"IGNORE", "mask", "rotary_sin", "rotary_cos", "b_U"}
    return tl.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformer_lens_computes_the_stored_values_at_the_names_given(tiny_model_dir: Any, arch: str) -> None:
    """The name a saved SAE carries is where TransformerLens (hence SAELens) holds the same values."""
    from transformers import AutoModelForCausalLM

    from activault.collection.hooks import Capture, resolve_hooks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
    hooks = ["models.layers.1.pre", "models.layers.1.post", "models.layers.1.attn.post", "models.layers.1.mlp.post"]
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with Capture(model, resolve_hooks(model, hooks)) as capture:  # collection's own capture
        stored = capture(ids, torch.arange(9).expand(2, 9), torch.ones(2, 9, dtype=torch.int32))
    _, cache = _hooked_transformer(model, arch).run_with_cache(ids)
    for hook in hooks:
        name = transformer_lens_name(hook, model.config.model_type)
        assert name is not None
        torch.testing.assert_close(stored[hook].float(), cache[name], rtol=1e-4, atol=1e-5)


def test_the_sae_metadata_comes_from_the_run(tiny_model_dir: Any, tmp_path: Path) -> None:
    """model name, context size and TransformerLens hook name from cfg.json (was: left empty)."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from activault.collection.pipeline import collect
    from support.collecting import make_cfg

    llama = tiny_model_dir("llama")
    collect(make_cfg(llama, tmp_path, data={"n_batches": 2}), show_progress=False)
    root = tmp_path / "run"
    cfg = SAETrainerConfig(total_training_samples=32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3)
    with VaultProvider(root, "models.layers.1.post", batch_tokens=32) as provider:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=32, k=2))
        set_scaling_factor(SAETrainer(cfg=cfg, sae=sae, data_provider=provider), provider)
    saved = sae.cfg.to_dict()["metadata"]
    assert (saved["hook_name"], saved["model_name"], saved["context_size"]) == (
        "blocks.1.hook_resid_post",
        str(llama),
        64,
    )
    assert saved["activault_hook"] == "models.layers.1.post"
    mine = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=32, k=2))
    mine.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"  # set by hand: kept
    assert fill_metadata(mine, root, "models.layers.0.mlp.post") == {
        "activault_hook": "models.layers.0.mlp.post",
        "model_name": str(llama),
        "context_size": 64,
    }
    assert mine.cfg.metadata.hook_name == "blocks.0.hook_mlp_out"
    assert sae_metadata(root, "models.layers.0.mlp.post")["hook_name"] == "blocks.0.hook_mlp_out"
    with pytest.raises(NotFoundError, match="cfg.json does not exist"):
        sae_metadata(tmp_path, "models.layers.1.post")


def test_transformer_lens_computes_bert_s_stored_values_at_the_names_given() -> None:
    """BERT (the real all-MiniLM-L6-v2 weights), two documents packed in a row: TransformerLens's
    HookedEncoder, run on each document alone, holds the stored values at the names given (post-norm
    blocks: `post` is `hook_normalized_resid_post`, the MLP's output before its residual and LayerNorm
    is `hook_mlp_out`); the attention module's output (added and normalised) has no name."""
    from transformer_lens import HookedEncoder, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_bert_weights
    from transformers import AutoModel, BertForPreTraining

    from activault.collection.hooks import Capture, resolve_hooks
    from support.realmodel import MODEL

    model = AutoModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    c = model.config
    with_heads = BertForPreTraining(c)  # the converter reads the MLM and NSP heads too; no hook uses them
    with_heads.bert.load_state_dict(model.state_dict())
    cfg = HookedTransformerConfig(
        **_dims(c),
        normalization_type="LN",
        eps=c.layer_norm_eps,
        attention_dir="bidirectional",
        original_architecture="BertForMaskedLM",
    )
    tl = HookedEncoder(cfg)
    missing = tl.load_state_dict(convert_bert_weights(with_heads, cfg), strict=False).missing_keys
    assert {k.rsplit(".", 1)[-1] for k in missing} <= {"IGNORE", "mask"}
    tl.eval()
    hooks = ["models.layers.0.pre", "models.layers.2.pre", "models.layers.2.post", "models.layers.2.mlp.post"]
    hooks += ["models.layers.-1.post", "models.layers.2.attention.post"]
    ids = torch.randint(1000, c.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2]], dtype=torch.int32)
    with Capture(model, resolve_hooks(model, hooks)) as capture:
        stored = capture(ids, positions, segments)
    docs = [slice(0, 5), slice(5, 9)]
    caches = [tl.run_with_cache(ids[:, doc])[1] for doc in docs]
    names = {h: transformer_lens_name(h, c.model_type, c.num_hidden_layers) for h in hooks}
    assert names["models.layers.-1.post"] == "blocks.5.hook_normalized_resid_post"
    assert names["models.layers.2.attention.post"] is None
    for hook, name in names.items():
        for doc, cache in zip(docs, caches, strict=True):
            if name is not None:
                torch.testing.assert_close(stored[hook][:, doc].float(), cache[name], rtol=1e-4, atol=1e-4)
