"""`activault shuffle` against a copy of the same run with the same store (issue 31: goal >= 0.5x).

A synthetic run (support/synth.py, written through the run writer, with provenance) is written
once; each repetition then copies it object by object (`get` then `put`, the store as `activault`
opens it: locally with fsync) and shuffles it (`shuffle_run`, `memory` a fraction of the run), in
an order that alternates between repetitions. Each ratio is the copy's seconds over the shuffle's
within one repetition; printed as median (min-max), and one JSON line is appended to `--json`.

    python -m bench.shuffle [--files 32] [--rows 64] [--seq 256] [--d 512] [--reps 3] [--memory 0.5]

The default run is 1 GiB of 16 MiB files per hook: a collected run's files are 100 MiB to several
GiB, and with 4 MiB files (`--rows 16`) the per-file costs (creating, renaming and syncing files,
progress records; more of them for two passes than for a copy) weigh several times what they do
in practice.

Local files go under $BENCH_DIR (default: the system's temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.record import stamp

OUT = Path(__file__).parent / "out" / "shuffle.jsonl"
HOOKS = ["h1", "h2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=32, help="files per hook")
    ap.add_argument("--rows", type=int, default=64, help="rows per file")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d", type=int, default=512, help="width of each hook's states (bfloat16)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory", type=float, default=0.5, help="shuffle memory as a fraction of the run's bytes")
    ap.add_argument("--json", type=Path, default=OUT, help="one JSON line per invocation is appended here")
    return ap.parse_args(argv)


def copy_run(store: Any, src: str, dst: str) -> float:
    """Seconds to copy every object of `src` to `dst`, one after another (`get` allocates a buffer
    per object: reading into one reused buffer instead measured the same, 0.23 s either way here)."""
    t0 = time.perf_counter()
    for e in store.list(src):
        store.put(dst + e.key[len(src) :], store.get(e.key))
    return time.perf_counter() - t0


def run_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from activault.storage import LocalStore
    from activault.tools.shuffle import shuffle_run
    from support.synth import write_synthetic_run

    tmp = Path(tempfile.mkdtemp(prefix="activault-bench-", dir=os.environ.get("BENCH_DIR")))
    runs: list[dict[str, Any]] = []
    try:
        write_synthetic_run(
            LocalStore(tmp, fsync=False),
            "run",
            HOOKS,
            files=args.files,
            rows=args.rows,
            seq=args.seq,
            d=args.d,
            documents=True,
        )
        size = run_bytes(tmp / "run")
        store = LocalStore(tmp)  # as the CLI opens it: fsync on
        memory = int(size * args.memory)
        for rep in range(args.reps):
            order = ["copy", "shuffle"] if rep % 2 == 0 else ["shuffle", "copy"]
            got: dict[str, Any] = {"rep": rep}
            for case in order:
                if case == "copy":
                    got["copy_s"] = copy_run(store, "run", f"copy{rep}")
                else:
                    r = shuffle_run(store, "run", store, f"dst{rep}", seed=rep, memory=memory)
                    got |= {"shuffle_s": r.seconds, "buckets": r.buckets, "peak_tokens": r.peak_tokens}
                    got |= {"bound_tokens": r.bound_tokens, "tokens": r.tokens}
                shutil.rmtree(tmp / f"copy{rep}", ignore_errors=True)
                shutil.rmtree(tmp / f"dst{rep}", ignore_errors=True)
            got["ratio"] = got["copy_s"] / got["shuffle_s"]
            runs.append(got)
            print(
                f"rep {rep}: copy {got['copy_s']:.2f} s, shuffle {got['shuffle_s']:.2f} s ({got['buckets']} "
                f"bucket(s)): {got['ratio']:.2f}x the copy's speed"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [r["ratio"] for r in runs]
    print(
        f"\n{len(HOOKS)} hooks x {args.files} files of [{args.rows}, {args.seq}, {args.d}] bf16 + ids, positions, "
        f"documents ({size / 2**20:.0f} MiB), memory {args.memory:g} x the run, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}: shuffle / copy speed {summary(ratios)}, median (min-max)"
    )
    record = {
        **stamp("bench.shuffle", sys.argv[1:] if argv is None else argv),
        "load": os.getloadavg()[0],
        "args": {**vars(args), "json": str(args.json)},
        "run_bytes": size,
        "figure": "shuffle / copy speed, local store with fsync",
        "goal": 0.5,
        "ratios": ratios,
        "median": statistics.median(ratios),
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
