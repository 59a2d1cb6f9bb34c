"""Synthetic runs written exactly as `collect` writes them (through the run writer), and S3 helpers,
for reader tests."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from activault import dtypes
from activault.storage import Store
from activault.vault import records
from activault.vault.stats import RunningStats, merge_all
from activault.vault.writer import RunWriter


@dataclass
class SynthRun:
    """What `write_synthetic_run` wrote: tensors per hook and file name, in sorted name order."""

    run: str
    hooks: list[str]
    names: list[str]  # file names, sorted (machine, then index)
    files: dict[str, dict[str, dict[str, torch.Tensor]]]  # hook -> name -> states/input_ids/positions
    stats: dict[str, RunningStats] = field(default_factory=dict)  # hook -> merged over machines

    def tensor(self, hook: str, key: str = "states", names: list[str] | None = None) -> torch.Tensor:
        """`key` of the given files (default all, in name order) concatenated along rows."""
        return torch.cat([self.files[hook][n][key] for n in (names or self.names)])


def write_synthetic_run(
    store: Store,
    run: str,
    hooks: list[str],
    *,
    machines: int = 1,
    files: int = 3,
    rows: int = 4,
    seq: int = 16,
    d: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    pad: int = 3,
    nonfinite: Sequence[tuple[str, int, int, int, float]] = (),
    documents: bool = False,
) -> SynthRun:
    """cfg.json, progress, metadata.json, statistics.json and megabatches of `run`, as collect writes them.

    Documents are packed into rows (positions restart at 0); the last row of each machine ends
    with `pad` padding tokens (position -1, zero states, not in the statistics). `nonfinite`:
    (hook, file number in name order, row, seq, value) of values to store, e.g. NaN, in the token's
    first dimension (collect's `on_nonfinite: warn`: stored, left out of the statistics).
    `documents`: store provenance (format version 4), each document's ordinal in its machine's stream.
    """
    g = torch.Generator().manual_seed(seed)
    out = SynthRun(run, list(hooks), [], {h: {} for h in hooks})
    record = _run_record(run, hooks, machines, d, dtype)
    meta = records.hook_metadata(
        run_name=run,
        hook=hooks[0],
        d_model=d,
        dtype=dtype,
        seq_length=seq,
        rows_per_file=rows,
        batch_size=rows,
        batches_per_upload=1,
        model="synthetic",
    )
    metadata = {h: meta.model_copy(update={"hook": h}) for h in hooks}
    partial: dict[int, dict[str, RunningStats]] = {}
    for m in range(machines):
        writer = RunWriter(store, record, metadata, m, threads=2)
        writer.join()
        partial[m] = {h: RunningStats(d) for h in hooks}
        ordinal = 0  # the machine's next document
        try:
            for k in range(files):
                name = records.file_name(m, k)
                out.names.append(name)
                ids, pos = _packed_rows(g, rows, seq, pad if k == files - 1 else 0)
                docs = None
                if documents:  # every file starts a document (positions restart at 0)
                    docs = torch.cumsum((pos == 0).reshape(-1), 0).view(rows, seq) - 1 + ordinal
                    docs[pos == -1] = -1
                    ordinal = int(docs.max()) + 1
                states = {}
                for hi, h in enumerate(hooks):
                    states[h] = (torch.randn(rows, seq, d, generator=g) * (1 + hi) + 0.5 * (hi + 1)).to(dtype)
                    states[h][pos == -1] = 0
                    for hook, f, r, t, value in nonfinite:
                        if (hook, f) == (h, len(out.names) - 1):
                            states[h][r, t, 0] = value
                    out.files[h][name] = {"states": states[h], "input_ids": ids, "positions": pos}
                    if docs is not None:
                        out.files[h][name]["documents"] = docs
                    partial[m][h].update(states[h][pos != -1])
                # Every token counts in tokens_done, as in the records these tests were written against.
                writer.write_file(states, ids, pos, tokens=rows * seq, data_state={}, stats=partial[m], documents=docs)
            writer.finish({}, partial[m])
        except BaseException:
            writer.abort()
            raise
    for h in hooks:
        total = merge_all(partial[m][h] for m in range(machines))
        assert total is not None
        out.stats[h] = total
    return out


def _edit_stats(store: Store, run: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply `edit` to every statistics record of `run`: each hook's in the progress records and in
    statistics.json, rewritten in place."""
    _, progress = store.list_dir(f"{run}/progress")
    keys = [e.key for e in progress] + [f"{run}/{h}/statistics.json" for h in store.list_dir(run)[0]]
    for key in keys:
        if not store.exists(key):
            continue
        rec = json.loads(bytes(store.get(key)))
        for s in rec["stats"].values() if "stats" in rec else [rec]:
            edit(s)
        store.put(key, json.dumps(rec).encode())


def as_stats_version_1(store: Store, run: str) -> None:
    """Rewrite `run`'s progress records and statistics.json as activault wrote them before statistics
    left out tokens with NaN or Inf (stats_version 1): such tokens counted in, their statistics NaN."""

    def edit(s: dict[str, Any]) -> None:
        if s["nonfinite"]:
            s.pop("norm_hist", None)  # added in stats_version 3
            s.update(stats_version=1, count=s["count"] + s["nonfinite"], norm=math.nan)
            s.update(norm_sum=math.nan, norm_sq_sum=math.nan)
            for name in ("mean", "std", "m2"):
                s[name][0] = math.nan

    _edit_stats(store, run, edit)


def as_stats_version_2(store: Store, run: str) -> None:
    """Rewrite `run`'s progress records and statistics.json as activault wrote them before the norm
    histogram (stats_version 2)."""

    def edit(s: dict[str, Any]) -> None:
        s.pop("norm_hist", None)
        s["stats_version"] = min(s["stats_version"], 2)

    _edit_stats(store, run, edit)


def _run_record(run: str, hooks: list[str], machines: int, d: int, dtype: torch.dtype) -> records.RunRecord:
    model = {"name": "synthetic", "architecture": "none", "model_type": "none", "d_model": d, "n_layers": 1}
    return records.RunRecord(
        run_name=run,
        tokenizer="synthetic",
        hooks=list(hooks),
        num_runs=machines,
        activault_version="test",
        model={**model, "dtype": dtypes.name(dtype)},
    )


def _packed_rows(g: torch.Generator, rows: int, seq: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, positions) [rows, seq] int32: documents of random lengths packed back to back
    (position restarts at each start); the last `pad` tokens are padding (position -1)."""
    ids = torch.randint(0, 1000, (rows, seq), generator=g, dtype=torch.int32)
    starts = torch.rand(rows * seq, generator=g) < 0.15
    starts[0] = True
    idx = torch.arange(rows * seq)
    last_start = torch.cummax(torch.where(starts, idx, 0), 0).values
    pos = (idx - last_start).to(torch.int32).view(rows, seq)
    if pad:
        pos[-1, -pad:] = -1
    return ids, pos


MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def create_bucket(url: str, bucket: str) -> None:
    """Create `bucket` on the S3 server at `url` (boto3, test credentials)."""
    import boto3

    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket=bucket)


def make_public(url: str, bucket: str) -> None:
    """Let anonymous (unsigned) requests list and read `bucket`, like a public dataset bucket."""
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{bucket}/*"},
            {"Effect": "Allow", "Principal": "*", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
        ],
    }
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def s3_env(url: str) -> dict[str, str]:
    """Environment for activault's S3Store against the server at `url`."""
    return {**MOTO_ENV, "S3_ENDPOINT_URL": url}


def copy_tree(root: Path, store: Store, prefix: str) -> None:
    """Every file under the local folder `root` put at `prefix/<its relative path>` of `store` (e.g. a
    run collected locally, onto moto)."""
    for p in root.rglob("*"):
        if p.is_file():
            store.put(f"{prefix}/{p.relative_to(root).as_posix()}", [memoryview(p.read_bytes())])
