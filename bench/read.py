"""Reads at the limit: RCache, TokenLoader and the original's reader as ratios to baselines of the same run.

Every case runs in its own process (bench/readers.py: the readers and the baselines); the cases
of one repetition run in a new shuffled order each time, and each figure is a ratio of two cases
of the SAME repetition, reported as its median (min-max) over `--reps`. Stores:

- local, warm: every file read just before (the page cache holds it); cold: written, then evicted
  with posix_fadvise(DONTNEED) file by file (after an fsync). Residency is checked, not assumed:
  mincore(2) on a mapping of every file (support/pagecache.py) just before each run's clock, and
  reported as `resident` (cold ~0, warm ~1).
- moto: a moto S3 server as it is (it reads a whole object for every ranged GET).
- proxy: moto behind bench/proxy.py, which caps each connection at `--cap-mbps` MB/s and delays
  each answer's first byte by `--first-byte-ms`, like AWS. Ranges go through to moto as asked, so
  moto's own time per GET stays in and is reported (`upstream ms/GET`): moto reads the whole object
  for every ranged GET, on the same two cores as the readers.
- paced: the same pacing by support/s3servers.py's ThrottleProxy, which fetches each object from
  moto once and serves its ranges itself, so that a range costs its own bytes, as on a real
  endpoint whose servers are not on the reader's cores.

Two runs are written: `run` raw and `zrun` with zstd (bench/readers.py compares the decoders with
the codec's own decode of the same chunks on every core, `decode-limit`, and TokenLoader with that
decode followed by the same gather, `decode-gather`). Each invocation appends
one JSON line (figures, per-reader rows, every run) to `--json` and prints two tables.

    python -m bench.read [--files 4] [--mib 64] [--reps 5] [--stores local,moto,proxy,paced]

Local files go under $BENCH_DIR (default: the system's temporary folder): point it at another
filesystem (NFS, Lustre) to see the readers there, mapped (`rcache`) against read (`rcache-read`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.record import run_writer, stamp

OUT = Path(__file__).parent / "out" / "read.jsonl"
ROOT = Path(__file__).resolve().parent.parent
SEQ = 1024
ZSTD = ("decode-limit", "decode-gather", "rcache-zstd", "tokens-zstd", "rcache-zstd-again", "tokens-zstd-again")
READERS = {
    "local": [
        *("raw-one", "raw-one-map", "raw", "raw-map", "raw-gather", "raw-map-gather"),
        *("rcache", "rcache-read", "rcache-fresh", "tokens", "tokens-read", "original", *ZSTD),
        *("rcache-read-again", "tokens-read-again"),
    ],
    "moto": ["raw-one", "raw", "rcache", "tokens", "raw-1get", "rcache-1get"],
    "proxy": [
        *("raw-one", "raw", "raw-gather", "rcache", "tokens", "original"),
        *("rcache-zstd", "tokens-zstd", "raw-1get", "rcache-1get", "rcache-again", "tokens-again"),
    ],
    "paced": [
        *("raw-one", "raw", "raw-gather", "rcache", "tokens", "original"),
        *("rcache-zstd", "tokens-zstd", "rcache-again", "tokens-again"),
    ],
}
S3_STORES = ("moto", "proxy", "paced")
# (figure, store, cache, reader, baseline, measure, goal): measure "rate" is the reader's
# bytes/s over the baseline's, "first" the reader's first item over the baseline's whole time.
FIGURES = [
    ("RCache / (mmap + populate), page cache", "local", "warm", "rcache", "raw-map", "rate", ">= 0.9"),
    ("RCache / (pread, reused buffers), page cache", "local", "warm", "rcache", "raw", "rate", ">= 0.9"),
    ("RCache / (mmap + populate), cold", "local", "cold", "rcache", "raw-map", "rate", ">= 0.9"),
    ("RCache / (pread, reused buffers), cold", "local", "cold", "rcache", "raw", "rate", ">= 0.9"),
    ("TokenLoader / (mmap + gather), page cache", "local", "warm", "tokens", "raw-map-gather", "rate", ">= 0.9"),
    ("TokenLoader / (mmap + gather), cold", "local", "cold", "tokens", "raw-map-gather", "rate", ">= 0.9"),
    ("TokenLoader / (pread + gather), cold", "local", "cold", "tokens", "raw-gather", "rate", ">= 0.9"),
    ("TokenLoader map_reads=False / (pread + gather), page cache", "local", "warm", "tokens-read", "raw-gather")
    + ("rate", ">= 0.8"),
    ("TokenLoader first batch / one mapped file, page cache", "local", "warm", "tokens", "raw-one-map")
    + ("first", "<= 1.5"),
    ("TokenLoader first batch / one mapped file, cold", "local", "cold", "tokens", "raw-one-map", "first", "<= 1.5"),
    ("TokenLoader map_reads=False first batch / one file pread", "local", "warm", "tokens-read", "raw-one")
    + ("first", "<= 1.5"),
    # -again: after an untimed pass in the same process, buffers touched before the clock as the baselines'.
    ("RCache map_reads=False, warm buffers / (pread, reused buffers), page cache", "local", "warm")
    + ("rcache-read-again", "raw", "rate", ">= 0.9"),
    ("TokenLoader map_reads=False, warm buffers / (pread + gather), page cache", "local", "warm")
    + ("tokens-read-again", "raw-gather", "rate", ">= 0.8"),
    ("TokenLoader map_reads=False, warm buffers, first batch / one file pread", "local", "warm")
    + ("tokens-read-again", "raw-one", "first", "<= 1.5"),
    ("RCache first item / one mapped file, page cache", "local", "warm", "rcache", "raw-one-map", "first", ""),
    ("RCache zstd / decode limit, page cache", "local", "warm", "rcache-zstd", "decode-limit", "rate", ">= 0.85"),
    ("RCache zstd, warm buffers / decode limit, page cache", "local", "warm")
    + ("rcache-zstd-again", "decode-limit", "rate", ">= 0.85"),
    ("TokenLoader zstd / (decode limit + gather), page cache", "local", "warm", "tokens-zstd", "decode-gather")
    + ("rate", ">= 0.85"),
    ("TokenLoader zstd, warm buffers / (decode limit + gather), page cache", "local", "warm")
    + ("tokens-zstd-again", "decode-gather", "rate", ">= 0.85"),
    ("RCache zstd / RCache raw run, page cache", "local", "warm", "rcache-zstd", "rcache", "rate", ""),
    ("RCache / raw, moto", "moto", "-", "rcache", "raw", "rate", ">= 0.9"),
    ("RCache / raw, throttled S3", "proxy", "-", "rcache", "raw", "rate", ">= 0.9"),
    ("TokenLoader / (raw + gather), throttled S3", "proxy", "-", "tokens", "raw-gather", "rate", ">= 0.8"),
    ("TokenLoader first batch / one file's fetch, throttled S3", "proxy", "-", "tokens", "raw-one", "first", "<= 1.5"),
    ("RCache, warm buffers / raw, throttled S3", "proxy", "-", "rcache-again", "raw", "rate", ">= 0.9"),
    ("TokenLoader, warm buffers / (raw + gather), throttled S3", "proxy", "-", "tokens-again", "raw-gather")
    + ("rate", ">= 0.8"),
    ("RCache zstd / RCache raw run, throttled S3", "proxy", "-", "rcache-zstd", "rcache", "rate", ">= 1.3"),
    ("RCache zstd / raw reads of the raw run, throttled S3", "proxy", "-", "rcache-zstd", "raw", "rate", ">= 1.3"),
    ("TokenLoader zstd / TokenLoader raw run, throttled S3", "proxy", "-", "tokens-zstd", "tokens", "rate", ">= 1.3"),
    ("RCache / original (16 connections per file), throttled S3", "proxy", "-", "rcache", "original", "rate", ">= 2"),
    ("RCache / raw, S3 paced, ranges served", "paced", "-", "rcache", "raw", "rate", ">= 0.9"),
    ("TokenLoader / (raw + gather), S3 paced, ranges served", "paced", "-", "tokens", "raw-gather", "rate", ">= 0.8"),
    ("TokenLoader first batch / one file's fetch, S3 paced, ranges served", "paced", "-", "tokens", "raw-one")
    + ("first", "<= 1.5"),
    ("RCache, warm buffers / raw, S3 paced, ranges served", "paced", "-", "rcache-again", "raw", "rate", ">= 0.9"),
    ("TokenLoader, warm buffers / (raw + gather), S3 paced, ranges served", "paced", "-", "tokens-again")
    + ("raw-gather", "rate", ">= 0.8"),
    ("RCache zstd / RCache raw run, S3 paced, ranges served", "paced", "-", "rcache-zstd", "rcache", "rate", ">= 1.3"),
    ("RCache zstd / raw reads of the raw run, S3 paced, ranges served", "paced", "-", "rcache-zstd", "raw")
    + ("rate", ">= 1.3"),
    ("TokenLoader zstd / TokenLoader raw run, S3 paced, ranges served", "paced", "-", "tokens-zstd", "tokens")
    + ("rate", ">= 1.3"),
    ("RCache / original (16 connections per file), S3 paced, ranges served", "paced", "-", "rcache", "original")
    + ("rate", ">= 2"),
]


def write_files(store: Any, n: int, rows: int, d: int) -> None:
    """Runs `run` (raw) and `zrun` (zstd) of `n` files through the run writer (as collect writes
    them), and the same tensors as the original project's `.pt` files."""
    import torch

    from activault.vault import codec as codecs
    from activault.vault.stats import RunningStats
    from activault.vault.writer import RunWriter

    def writer(run: str, codec: codecs.Codec | None) -> RunWriter:
        return run_writer(store, run, d, rows, SEQ, codec)

    writers = [writer("run", None), writer("zrun", codecs.from_config("zstd"))]
    stats = {"hook": RunningStats(d)}  # as collect records them: a record without them reads as damaged
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        states = torch.randn(rows, SEQ, d, generator=g).to(torch.bfloat16)
        ids = torch.randint(0, 50_000, (rows, SEQ), generator=g, dtype=torch.int32)
        pos = torch.arange(SEQ, dtype=torch.int32).expand(rows, SEQ).contiguous()
        stats["hook"].update(states.reshape(-1, d))
        for w in writers:
            w.write_file({"hook": states}, ids, pos, tokens=rows * SEQ, data_state=None, stats=stats)
        buf = io.BytesIO()
        torch.save({"states": states, "input_ids": ids.long()}, buf)
        store.put(f"legacy/hook/{k:04d}--{k}.pt", buf.getbuffer())
    for w in writers:
        w.finish(None, stats)


def spread(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs) * scale:.{digits}f} ({min(xs) * scale:.{digits}f}-{max(xs) * scale:.{digits}f})"


def figures(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each figure's ratio in every repetition that ran both its cases."""
    at = {(r["store"], r["cache"], r["reader"], r["rep"]): r for r in runs}
    out = []
    for name, store, cache, reader, base, measure, goal in FIGURES:
        pairs = [
            (r, at[(store, cache, base, r["rep"])])
            for r in runs
            if (r["store"], r["cache"], r["reader"]) == (store, cache, reader) and (store, cache, base, r["rep"]) in at
        ]
        if not pairs:
            continue
        if measure == "rate":
            ratios = [r["gb_s"] / b["gb_s"] for r, b in pairs]
            steady = [r["steady_gb_s"] / b["steady_gb_s"] for r, b in pairs if r["steady_gb_s"] and b["steady_gb_s"]]
        else:
            ratios, steady = [r["first_s"] / b["seconds"] for r, b in pairs], []
        out.append(
            {"figure": name, "store": store, "cache": cache, "reader": reader, "baseline": base, "measure": measure}
            | {"goal": goal, "ratios": ratios, "steady_ratios": steady}
        )
    return out


def per_reader(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (store, cache, reader): every repetition's absolute figures, in READERS' order."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["store"], r["cache"], r["reader"]), []).append(r)
    rows = []
    for (store, cache, name), rs in by.items():
        row: dict[str, Any] = {"store": store, "cache": cache, "reader": name, "reps": len(rs)}
        for k in ("gb_s", "steady_gb_s", "first_s", "cpu_s_per_gb", "resident_before"):
            row[k] = [r[k] for r in rs if r[k] is not None]
        row["minor_faults_per_gb"] = [r["minor_faults"] / (r["bytes"] / 1e9) for r in rs]
        row["peak_rss_mib"] = [r["peak_rss"] / 2**20 for r in rs]
        gets = [r["proxy"] for r in rs if r.get("proxy") and r["proxy"].get("requests")]
        row["upstream_ms_per_get"] = [1e3 * p["upstream_s"] / p["requests"] for p in gets]
        row["gets"] = [p["requests"] for p in gets]
        rows.append(row)
    order = [r for store in READERS.values() for r in store]
    return sorted(rows, key=lambda r: (r["store"], r["cache"] != "warm", order.index(r["reader"])))


def print_tables(figs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    print(f"{'figure':62} {'ratio, whole run':>20} {'steady':>20}  goal")
    for f in figs:
        print(f"{f['figure']:62} {spread(f['ratios']):>20} {spread(f['steady_ratios']):>20}  {f['goal']}")
    print()
    cols = ("GB/s", "steady GB/s", "first (ms)", "CPU s/GB", "minflt/GB", "resident", "upstream ms/GET")
    print(f"{'store':5} {'cache':5} {'reader':14} " + " ".join(f"{c:>18}" for c in cols) + "  RSS MiB")
    for r in rows:
        cells = [
            spread(r["gb_s"]),
            spread(r["steady_gb_s"]),
            spread(r["first_s"], 1e3, 0),
            spread(r["cpu_s_per_gb"]),
            spread(r["minor_faults_per_gb"], 1e-3, 0) + "k" if r["minor_faults_per_gb"] else "-",
            spread(r["resident_before"]),
            spread(r["upstream_ms_per_get"], 1, 1),
        ]
        rss = statistics.median(r["peak_rss_mib"])
        print(f"{r['store']:5} {r['cache']:5} {r['reader']:14} " + " ".join(f"{c:>18}" for c in cells) + f" {rss:8.0f}")


def run_child(case: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    cmd = [sys.executable, "-m", "bench.readers", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{case['store']}/{case['reader']} failed:\n{out.stderr[-3000:]}")
    return {**case, **json.loads(out.stdout.strip().splitlines()[-1])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mib", type=int, default=64, help="states per file")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5 for a reported figure)")
    ap.add_argument("--buffer-size", type=int, default=2)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--stores", default="local,moto,proxy,paced")
    ap.add_argument(
        "--readers", default="", help="subset (baselines of their figures added): " + ", ".join(READERS["local"])
    )
    ap.add_argument("--cache", default="warm,cold", help="local store page cache states")
    ap.add_argument("--cap-mbps", type=float, default=90, help="proxy: MB/s (1e6 bytes/s) per connection")
    ap.add_argument("--first-byte-ms", type=float, default=30, help="proxy: latency added before each answer")
    ap.add_argument("--json", type=Path, default=OUT, help="one JSON line per invocation is appended here")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.files < 1:
        ap.error("--reps and --files must be at least 1")
    return args


def cases_for(args: argparse.Namespace, roots: dict[str, str], envs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = max(1, (args.mib << 20) // (SEQ * args.d * 2))
    common = {
        "range_size": None,  # the readers' default plan (fetch.range_step)
        "buffer_size": args.buffer_size,
        "window": args.window,
        "batch_tokens": args.batch_tokens,
        "file_bytes": rows * SEQ * (args.d * 2 + 8),
    }
    caches = {"local": args.cache.split(","), **{s: ["-"] for s in S3_STORES}}
    cases = [
        {"store": s, "cache": c, "cold": c == "cold", "root": roots[s], "env": envs[s], "reader": r, **common}
        for s in args.stores.split(",")
        for c in caches[s]
        for r in READERS[s]
        if not (c == "cold" and r in ZSTD)  # compressed: from the page cache and the throttled S3 only
    ]
    if args.readers:
        wanted = set(args.readers.split(","))
        # With each wanted reader, the baselines of its figures on the same store and cache.
        kept = {(f[1], f[2], f[4]) for f in FIGURES if f[3] in wanted}
        cases = [c for c in cases if c["reader"] in wanted or (c["store"], c["cache"], c["reader"]) in kept]
    return cases


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from activault.storage import LocalStore, open_store
    from bench.proxy import ThrottledProxy
    from bench.readers import touch_ms_per_mib
    from support.s3servers import MotoServer, ThrottleProxy

    rows = max(1, (args.mib << 20) // (SEQ * args.d * 2))
    stores = args.stores.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="activault-bench-", dir=os.environ.get("BENCH_DIR")))
    proxy = None
    roots = {"local": str(tmp), **{s: "s3://bench" for s in S3_STORES}}
    envs: dict[str, Any] = {"local": None}
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:  # unwound last first: proxies, server, then the files
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        if "local" in stores:
            write_files(LocalStore(tmp, fsync=False), args.files, rows, args.d)
        if set(stores) & set(S3_STORES):
            server = MotoServer().start()
            stack.callback(server.stop)
            server.create_bucket("bench")
            write_files(open_store("s3://bench", env=server.env()), args.files, rows, args.d)
            envs["moto"] = server.env()
            proxy = ThrottledProxy(server.url, cap=args.cap_mbps * 1e6, first_byte_s=args.first_byte_ms / 1e3).start()
            stack.callback(proxy.close)
            envs["proxy"] = server.env(proxy.url)
            paced = ThrottleProxy(server.url, rate=args.cap_mbps * 1e6, latency_s=args.first_byte_ms / 1e3)
            envs["paced"] = server.env(stack.enter_context(paced).url)
        cases = cases_for(args, roots, envs)
        for rep in range(args.reps):
            random.Random(rep).shuffle(cases)  # interleaved: no case always runs first or after another
            for case in cases:
                before = proxy.snapshot() if proxy is not None else {}
                try:
                    run = {**run_child(case), "rep": rep}
                except RuntimeError as e:  # kept and reported at the end: one failing reader loses no other run
                    failed.append({**case, "rep": rep, "error": str(e)[-3000:]})
                    print(f"rep {rep} {case['store']:5} {case['cache']:4} {case['reader']:14} FAILED")
                    continue
                if case["store"] == "proxy" and proxy is not None:
                    after = proxy.snapshot()
                    run["proxy"] = {k: after[k] - before.get(k, 0) for k in after}
                runs.append(run)
                print(f"rep {rep} {case['store']:5} {case['cache']:4} {case['reader']:14} {run['gb_s']:.2f} GB/s")
    figs, table = figures(runs), per_reader(runs)
    file_bytes = cases[0]["file_bytes"] if cases else 0
    touch = touch_ms_per_mib()  # this machine's cost of fresh memory, which the -again readers leave out
    print(
        f"\n{args.files} files x {file_bytes / 2**20:.0f} MiB (bf16 [{rows}, {SEQ}, {args.d}] + ids, positions), "
        f"buffer_size={args.buffer_size}, window={args.window}, {args.reps} reps, {os.cpu_count()} CPUs, "
        f"proxy {args.cap_mbps:g} MB/s per connection + {args.first_byte_ms:g} ms; median (min-max); "
        f"a fresh buffer's first touch: {touch:.2f} ms/MiB"
    )
    print_tables(figs, table)
    record = {
        **stamp("bench.read", sys.argv[1:] if argv is None else argv),
        "args": {**vars(args), "json": str(args.json)},
        "file_bytes": file_bytes,
        "touch_ms_per_mib": touch,
        "figures": figs,
        "readers": table,
        "runs": [{k: v for k, v in r.items() if k not in ("env", "root")} for r in runs],
        "failed": [{k: v for k, v in r.items() if k not in ("env", "root")} for r in failed],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {args.json}", file=sys.stderr)
    if failed:
        for r in failed:
            print(f"\n{r['store']}/{r['cache']}/{r['reader']} (rep {r['rep']}) failed:\n{r['error']}", file=sys.stderr)
        sys.exit(f"{len(failed)} of {len(runs) + len(failed)} runs failed (above); their figures are left out")


if __name__ == "__main__":
    main()
