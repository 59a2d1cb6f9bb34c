"""Runs and caches the integration tests share: `sparse_run` (structured activations a sparse coder
can learn) and `saelens_cache` (a cache written by SAELens's own code)."""

from __future__ import annotations

from pathlib import Path

import torch

from activault.integrations import shared as v
from activault.storage import LocalStore

HOOKS = ["h1", "h2"]


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
