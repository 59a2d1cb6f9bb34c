"""The cost of mixing (issue 31: goal >= 0.95): TokenLoader reading a weighted mixture of two runs
against TokenLoader reading the same tokens as one run.

Three runs are written once through the run writer (local store, page cache warm): `one` holds
`--files` files, `a` the first half of them and `b` the second half (the same tensors). Each
repetition reads an epoch of `one` (`TokenLoader(one)`) and an epoch of the mixture
(`TokenLoader([a, b], weights=[1, 1])`), in this process, in an order that alternates between
repetitions; a repetition's ratio is the mixture's tokens/s over the single run's (and, reported
beside it, the mixture's CPU seconds over the single run's, every thread of the process). An untimed first
pass of each warms the page cache and checks both read the same tokens (count, and sums over
the states' bits). Printed as median (min-max); one JSON line is printed and appended to `--json`.

    python -m bench.mixing [--files 8] [--mib 32] [--d 1024] [--reps 5] [--batch-tokens 4096]

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

from bench.record import run_writer, stamp

OUT = Path(__file__).parent / "out" / "mixing.jsonl"
SEQ = 1024
GOAL = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8, help="files of the single run (even: half in each mixed run)")
    ap.add_argument("--mib", type=int, default=32, help="states per file")
    ap.add_argument("--d", type=int, default=1024, help="width of the states (bfloat16)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5 for a reported figure)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--json", type=Path, default=OUT, help="one JSON line per invocation is appended here")
    args = ap.parse_args(argv)
    if args.files < 2 or args.files % 2 or args.reps < 1:
        ap.error("--files must be even and at least 2, --reps at least 1")
    return args


def write_runs(store: Any, files: int, rows: int, d: int) -> None:
    """Runs `one` (every file), `a` (the first half) and `b` (the second), the same tensors."""
    import torch

    from activault.vault.stats import RunningStats
    from activault.vault.writer import RunWriter

    def writer(run: str) -> RunWriter:
        return run_writer(store, run, d, rows, SEQ)

    one, halves = writer("one"), [writer("a"), writer("b")]
    stats = {w: {"hook": RunningStats(d)} for w in (one, *halves)}  # each run's, as collect keeps them
    g = torch.Generator().manual_seed(0)
    for k in range(files):
        states = torch.randn(rows, SEQ, d, generator=g).to(torch.bfloat16)
        ids = torch.randint(0, 50_000, (rows, SEQ), generator=g, dtype=torch.int32)
        pos = torch.arange(SEQ, dtype=torch.int32).expand(rows, SEQ).contiguous()
        for w in (one, halves[2 * k // files]):
            stats[w]["hook"].update(states.reshape(-1, d))
            w.write_file({"hook": states}, ids, pos, tokens=rows * SEQ, data_state=None, stats=stats[w])
    for w in (one, *halves):
        w.finish(None, stats[w])


def loader(root: Path, case: str, args: argparse.Namespace) -> Any:
    from activault import TokenLoader

    common = {"hooks": ["hook"], "batch_tokens": args.batch_tokens, "window": args.window}
    if case == "single":
        return TokenLoader(str(root / "one"), **common)
    return TokenLoader([str(root / "a"), str(root / "b")], weights=[1, 1], **common)


def read_epoch(root: Path, case: str, args: argparse.Namespace, check: bool = False) -> dict[str, Any]:
    """An epoch of `case`: tokens, seconds, and with `check` the sum and the sum of squares of the
    states' bit patterns (int64: exact, whatever the order)."""
    import torch

    tokens, total, squares = 0, 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    with loader(root, case, args) as batches:
        for batch in batches:
            tokens += len(batch["hook"])
            if check:
                x = batch["hook"].view(torch.int16).long()
                total, squares = total + int(x.sum()), squares + int(torch.square(x).sum())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "cpu_s": cpu,
        "sum": total,
        "squares": squares,
    }


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from activault.storage import LocalStore

    rows = max(1, (args.mib << 20) // (SEQ * args.d * 2))
    root = Path(tempfile.mkdtemp(prefix="activault-bench-mixing-", dir=os.environ.get("BENCH_DIR")))
    try:
        write_runs(LocalStore(root, fsync=False), args.files, rows, args.d)
        first = {case: read_epoch(root, case, args, check=True) for case in ("single", "mixed")}
        same = all(first["single"][k] == first["mixed"][k] for k in ("tokens", "sum", "squares"))
        if not same:
            sys.exit(f"the mixture read other tokens than the single run: {first}")
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            order = ("single", "mixed") if rep % 2 == 0 else ("mixed", "single")  # neither always first
            got = {case: read_epoch(root, case, args) for case in order}
            ratio = got["mixed"]["tok_s"] / got["single"]["tok_s"]
            cpu_ratio = got["mixed"]["cpu_s"] / got["single"]["cpu_s"]
            fields = ("tokens", "seconds", "tok_s", "cpu_s")
            runs.append({"rep": rep, **{f"{c}_{k}": got[c][k] for c in got for k in fields}, "ratio": ratio})
            runs[-1]["cpu_ratio"] = cpu_ratio
            print(
                f"rep {rep}: single {got['single']['tok_s']:,.0f} tok/s, mixed {got['mixed']['tok_s']:,.0f} "
                f"tok/s, ratio {ratio:.3f}; CPU seconds mixed / single {cpu_ratio:.3f}",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = [r["ratio"] for r in runs]
    record = {
        "bench": "mixing",
        **stamp("bench.mixing", sys.argv[1:] if argv is None else argv),
        "load_average": os.getloadavg(),
        "args": {**vars(args), "json": str(args.json)},
        "file_bytes": rows * SEQ * (args.d * 2 + 8),
        "tokens": first["single"]["tokens"],
        "same_tokens": same,
        "figure": "TokenLoader mixture of two runs (weights 1:1) / the same tokens as one run, page cache",
        "goal": f">= {GOAL}",
        "ratios": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        # The process's CPU seconds (every thread) of the mixture over the single run's: what mixing
        # costs, less sensitive than wall time to the other processes of a shared machine.
        "cpu_ratios": [r["cpu_ratio"] for r in runs],
        "runs": runs,
    }
    print(f"mixed / single tokens/s: {summary(ratios)} over {args.reps} reps (goal >= {GOAL})", file=sys.stderr)
    print(f"mixed / single CPU seconds: {summary(record['cpu_ratios'])}", file=sys.stderr)
    line = json.dumps(record)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.write(line + "\n")
    print(line)
    return record


if __name__ == "__main__":
    main()
