"""Vaults laid out exactly as the original Activault (tilde-research/activault) lays them out, for
reader tests: its `Config.to_dict()` as cfg.json, `HookUploader`'s metadata.json, statistics.json
and `{uuid}--{n}_{job}.saved.pt` files (`torch.save` of the dict it uploads), written with its
`json.dumps` and key order."""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field

import torch

from activault.storage import Store

MODEL = "meta-llama/Llama-3.3-70B-Instruct"


@dataclass
class OriginalVault:
    """What `write_original_vault` wrote: per hook, file name -> the dict `torch.save`d in it."""

    run: str
    hooks: list[str]
    names: list[str]  # file names, sorted (the order the readers list them in)
    files: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def tensor(self, hook: str, key: str = "states") -> torch.Tensor:
        """`key` of every file, in name order, concatenated along rows."""
        return torch.cat([self.files[hook][n][key] for n in self.names])


def write_original_vault(
    store: Store,
    run: str,
    hooks: list[str],
    *,
    machines: int = 1,
    files: int = 2,
    batch_size: int = 2,
    batches_per_file: int = 2,
    seq: int = 8,
    d: int = 16,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    slurm_job: int = 0,
) -> OriginalVault:
    """`run` as the original writes it: `machines` machines of `files` files per hook.

    Each file is `batches_per_file` batches of `[batch_size, seq, d]` states (the model's dtype)
    and int64 input ids; a group of files (one per hook) shares a uuid, and each hook's uploader
    numbers its uploads from 1. Machine 0 writes cfg.json and statistics.json (mean, std, norm, M2
    of its own tokens, with M2 summed over batch means as the original does: not exact); every
    uploader rewrites metadata.json after each upload, so it describes a whole file.
    """
    g = torch.Generator().manual_seed(seed)
    out = OriginalVault(run, list(hooks), [], {h: {} for h in hooks})
    rows = batch_size * batches_per_file
    running = {h: (torch.zeros(d), torch.zeros(d), 0, 0.0) for h in hooks}  # mean, M2, count, norm sum
    for m in range(machines):
        for n in range(1, files + 1):
            group = uuid.UUID(bytes=bytes(torch.randint(0, 256, (16,), generator=g).tolist()), version=4)
            name = f"{group}--{n}_{slurm_job}.saved.pt"
            ids = torch.randint(0, 32000, (rows, seq), generator=g, dtype=torch.int64)
            for hi, h in enumerate(hooks):
                states = (torch.randn(rows, seq, d, generator=g) * (1 + hi)).to(dtype)
                saved: dict[str, object] = {
                    "states": states,
                    "input_ids": ids,
                    "tensor_bytes": states.numel() * states.element_size() + ids.numel() * ids.element_size(),
                }
                buf = io.BytesIO()
                torch.save(saved, buf)
                store.put(f"{run}/{h}/{name}", buf.getvalue())
                out.files[h][name] = {"states": states, "input_ids": ids}
                store.put_text(f"{run}/{h}/metadata.json", json.dumps(_metadata(states, ids, batches_per_file, buf)))
                if m == 0:
                    running[h] = _welford(running[h], states, batch_size)
    out.names = sorted(out.files[hooks[0]])
    for h in hooks:
        mean, m2, count, norm_sum = running[h]
        stats = {
            "mean": mean.tolist(),
            "std": (m2 / count).sqrt().tolist(),
            "norm": norm_sum / count,
            "M2": m2.tolist(),
        }
        store.put_text(f"{run}/{h}/statistics.json", json.dumps(stats))
    cfg = {
        "run_name": run,
        "transformer_config": {"model_name": MODEL, "dtype": str(dtype).removeprefix("torch."), "cache_dir": "/cache"},
        "data_config": {
            "bucket_name": "main",
            "n_batches": files * batches_per_file,
            "seq_length": seq,
            "batch_size": batch_size,
        },
        "upload_config": {"batches_per_upload": batches_per_file, "hooks": list(hooks)},
        "total_tokens": files * rows * seq,
        "d_model": d,
        "n_total_files": files,
        "batches_processed": files * batches_per_file,
        "num_runs": machines,
    }
    store.put_text(f"{run}/cfg.json", json.dumps(cfg))
    return out


def _metadata(states: torch.Tensor, ids: torch.Tensor, batches_per_file: int, buf: io.BytesIO) -> dict[str, object]:
    """`HookUploader._get_metadata` of the uploaded dict, then its `bytes_per_file` (as `_save` does)."""
    return {
        "batch_size": states.shape[0],
        "sequence_length": states.shape[1],
        "dtype": str(states.dtype),
        "d_in": states.shape[2],
        "batches_per_file": batches_per_file,
        "shape": list(states.shape),
        "input_ids_shape": list(ids.shape),
        "bytes_per_file": len(buf.getvalue()),
    }


def _welford(
    acc: tuple[torch.Tensor, torch.Tensor, int, float], states: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The original's update per batch (generate.py): M2 from batch means only."""
    mean, m2, count, norm_sum = acc
    for batch in states.float().split(batch_size):
        tokens = batch.shape[0] * batch.shape[1]
        count += tokens
        delta = batch.mean(dim=(0, 1)) - mean
        mean = mean + delta * (tokens / count)
        m2 = m2 + tokens * delta * (batch.mean(dim=(0, 1)) - mean)
        norm_sum += float(torch.norm(batch, dim=2).sum())
    return mean, m2, count, norm_sum
