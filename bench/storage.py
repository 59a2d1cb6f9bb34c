"""Upload throughput on a moto S3 server: the writer (Writer + format.encode) vs a raw obstore.put of
the same bytes with the same client; and a tiny model's collection tokens/s on S3 vs the local store.

Prints a table and writes bench/out/storage.json.
    python -m bench.storage [--files 6] [--mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import obstore
import torch

from activault.collection.pipeline import collect
from activault.config import parse_config
from activault.storage.s3 import PART_CONCURRENCY, PART_SIZE, S3Store
from activault.tools.tiny import build_tiny
from activault.vault import megabatch as fmt
from activault.vault.writer_threads import Writer
from support.s3servers import MotoServer

OUT = Path(__file__).parent / "out" / "storage.json"
SEQ, D = 1024, 2048
THREADS = 4


def megabatches(n: int, mib: int) -> list[dict[str, torch.Tensor]]:
    rows = max(1, (mib << 20) // (SEQ * D * 2))
    g = torch.Generator().manual_seed(0)
    return [
        {
            "states": torch.randn(rows, SEQ, D, generator=g).to(torch.bfloat16),
            "input_ids": torch.randint(0, 50000, (rows, SEQ), generator=g, dtype=torch.int32),
            "positions": torch.arange(SEQ, dtype=torch.int32).repeat(rows, 1),
        }
        for _ in range(n)
    ]


def bench_upload(store: S3Store, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    encoded = [fmt.encode(t, {"format": fmt.FORMAT, "format_version": str(fmt.FORMAT_VERSION)}) for t in batches]
    raw = [b"".join(p) for p in encoded]
    total = sum(len(r) for r in raw)
    out: dict[str, Any] = {"files": len(raw), "bytes": total}
    for rnd in range(2):  # the first round warms the server; the second is reported
        t0 = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            list(
                pool.map(
                    lambda i, rnd=rnd: obstore.put(
                        store._store,
                        f"raw/{rnd}/{i}",
                        raw[i],
                        use_multipart=True,
                        chunk_size=PART_SIZE,
                        max_concurrency=PART_CONCURRENCY,
                    ),
                    range(len(raw)),
                )
            )
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        writer = Writer(store, threads=THREADS)
        for i, parts in enumerate(encoded):
            writer.write(f"writer/{rnd}/{i}", parts)
        writer.close()
        t_writer = time.perf_counter() - t0
    out.update(raw_MBps=total / t_raw / 1e6, writer_MBps=total / t_writer / 1e6, ratio=t_raw / t_writer)
    return out


def bench_collect(model: Path, storage: str, n_batches: int) -> dict[str, Any]:
    corpus = str(resources.files("activault").joinpath("demo_corpus.jsonl"))
    cfg = parse_config(
        {
            "run_name": f"bench-{time.monotonic_ns()}",
            "storage": storage,
            "transformer_config": {"model_name": str(model), "dtype": "float32", "device": "cpu"},
            "data_config": {"data_key": corpus, "n_batches": n_batches, "seq_length": 128, "batch_size": 8},
            "upload_config": {"batches_per_upload": 2, "hooks": ["models.layers.1.post", "models.layers.0.mlp.post"]},
        }
    )
    r = collect(cfg, show_progress=False)
    return {"tokens": r.tokens, "seconds": r.seconds, "tokens_per_s": r.tokens / r.seconds, "bytes": r.bytes_written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--batches", type=int, default=24)
    args = ap.parse_args()
    server = MotoServer().start()
    try:
        server.create_bucket("bench")
        env = server.env()
        store = S3Store("s3://bench", env=env)
        upload = bench_upload(store, megabatches(args.files, args.mib))
        with tempfile.TemporaryDirectory() as tmp:
            model = build_tiny(Path(tmp) / "model", "llama")
            os.environ.update(env)
            bench_collect(model, str(Path(tmp) / "warmup"), 2)  # imports and first-call costs, untimed
            local = bench_collect(model, str(Path(tmp) / "vault"), args.batches)
            s3 = bench_collect(model, "s3://bench/collect", args.batches)
    finally:
        server.stop()
    result = {
        "server": "moto",
        "upload": upload,
        "collect_local": local,
        "collect_s3": s3,
        "collect_ratio": s3["tokens_per_s"] / local["tokens_per_s"],
    }
    rows = [
        ("raw obstore.put (bytes)", f"{upload['raw_MBps']:,.0f} MB/s", ""),
        ("Writer + format.encode", f"{upload['writer_MBps']:,.0f} MB/s", f"{upload['ratio']:.2f} of raw (goal >= 0.9)"),
        ("collect, local store", f"{local['tokens_per_s']:,.0f} tok/s", ""),
        ("collect, S3 (moto)", f"{s3['tokens_per_s']:,.0f} tok/s", f"{result['collect_ratio']:.2f} of local"),
    ]
    print(f"{args.files} megabatches of {upload['bytes'] / args.files / 2**20:.0f} MiB bf16, {THREADS} writer threads")
    for name, value, note in rows:
        print(f"{name:28s} {value:>16s}  {note}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
