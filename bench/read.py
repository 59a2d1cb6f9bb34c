"""Read throughput against the storage limit: raw reads vs RCache, TokenLoader and the original's reader.

Every measurement runs in its own process (peak RSS is that process's), cases are interleaved in
a new order each repetition, and each figure is the median over `--reps` with its range. Ratios
compare a reader with the raw read of the same repetition, store and cache state: over the whole
run (readers: from construction) and steady (after the first item, the rate a long run settles at).

- raw-gather (for TokenLoader): raw reads held a window at a time, each window's tokens permuted
  and gathered into batches on TokenLoader's gather threads, a copy TokenLoader cannot avoid: the
  floor of any shuffling loader.
- raw: the files' bytes at the reader's concurrency (`buffer_size` files ahead, the same ranges,
  RANGE_WORKERS threads) into reused buffers, through the same Store; `raw-one`: one file alone,
  into a new buffer (the first-batch reference). raw-map, raw-map-gather (local): the files mapped
  (`Store.map`) and populated front to back, each by its file's thread, as the readers do there:
  no copy.
- `-read` readers (local): `map_reads=False`, files read into recycled buffers; `-fresh`: read
  into a new buffer per file.
- stores: local (warm: every file read just before; cold: posix_fadvise DONTNEED), a moto S3
  server, and moto behind a proxy that paces each connection like AWS (~90 MB/s, first-byte latency).
- original: the original project's reader (bench/original.py: boto3 ranged GETs, a prefetch
  worker process, its torch.load, copy and clone); on the local store a whole-file torch.load.

    python -m bench.read [--files 16] [--mib 64] [--reps 5] [--stores local,moto,proxy]

The local files go under $BENCH_DIR (default: the system's temporary folder): point it at another
filesystem (NFS, Lustre) to see how the readers do there, mapped (`rcache`) against read (`rcache-read`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out" / "read.json"
SEQ = 1024
READERS = {
    "local": [
        *("raw-one", "raw", "raw-gather", "raw-map", "raw-map-gather"),
        *("rcache", "rcache-read", "rcache-fresh", "tokens", "tokens-read", "original"),
    ],
    "moto": ["raw-one", "raw", "rcache", "tokens", "raw-1get", "rcache-1get"],
    "proxy": ["raw-one", "raw", "raw-gather", "rcache", "tokens", "original", "raw-1get", "rcache-1get"],
}


# -- the child: one reader, one run --------------------------------------------------------------


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in bytes.

    Not getrusage's ru_maxrss: Linux carries it across exec, so a child reports its parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def drop_cache(root: Path) -> None:
    """Evict the files under `root` from the page cache (clean pages; no root needed)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw(
    store: Any,
    folder: str,
    files: int | None,
    buffer_size: int,
    range_size: int | None,
    size: int,
    held: int = 1,
    mapped: bool = False,
) -> Iterator[memoryview]:
    """Each file's bytes, `buffer_size` files ahead, in the readers' ranges (`fetch.range_step`),
    into reused buffers (`held`: files the consumer keeps at once). `files=1` (one file alone, the
    first-batch reference): a new buffer, as any program reading one file allocates one. `mapped`:
    each file mapped (`Store.map`) and populated front to back by its thread instead of copied."""
    import numpy as np

    from activault.reading.fetch import RANGE_WORKERS, range_step
    from activault.storage.base import populate
    from activault.vault import megabatch as fmt

    # Reused buffers are touched before the clock starts (the first next()).
    bufs = [np.ones(size, np.uint8) for _ in range(buffer_size + held)] if files != 1 and not mapped else []
    yield memoryview(b"")
    keys = [(e.key, e.size) for e in store.list_dir(folder)[1] if fmt.is_megabatch(e.key)][:files]

    def fetch(key: str, n: int, k: int) -> memoryview:
        step = range_step(n, range_size)
        if mapped:
            mapping = store.map(key)
            for s in range(0, n, step):
                populate(mapping, s, min(s + step, n))
            return memoryview(mapping)[:n]
        view = (bufs[k % len(bufs)] if bufs else np.empty(n, np.uint8)).data.cast("B")[:n]
        list(ranges.map(lambda s: store.read_into(key, s, view[s : s + step]), range(0, n, step)))
        return view

    with ThreadPoolExecutor(buffer_size) as pool, ThreadPoolExecutor(RANGE_WORKERS) as ranges:
        pending = deque(pool.submit(fetch, k, n, i) for i, (k, n) in enumerate(keys[:buffer_size]))
        for i in range(len(keys)):
            view = pending.popleft().result()  # done with: a mapped file is unmapped once the consumer drops it
            if i + buffer_size < len(keys):
                k, n = keys[i + buffer_size]
                pending.append(pool.submit(fetch, k, n, i + buffer_size))
            yield view


def warm_cache(root: Path) -> None:
    """Read every file once: the page cache holds them (this VM's DAMON pages out idle memory)."""
    buf = bytearray(16 << 20)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def raw_gather(files: Iterator[memoryview], window: int, batch_tokens: int) -> Iterator[memoryview]:
    """The floor of any shuffling loader: `raw` files, a window at a time, their tokens' states
    permuted and gathered into a reused batch (np.take per file and batch, split over the same
    threads as TokenLoader's)."""
    import numpy as np

    from activault.reading.fetch import Workers
    from activault.reading.tokens import GATHER_THREADS, take_rows
    from activault.vault import megabatch as fmt

    rng = np.random.default_rng(0)
    batch: np.ndarray | None = None
    workers = Workers(GATHER_THREADS - 1, "gather") if GATHER_THREADS > 1 else None

    def gather(held: list[np.ndarray]) -> Iterator[memoryview]:
        nonlocal batch
        rows = held[0].shape[0]
        perm = rng.permutation(rows * len(held))
        for start in range(0, perm.size - batch_tokens + 1, batch_tokens):
            index = np.sort(perm[start : start + batch_tokens])
            if batch is None:
                batch = np.empty((batch_tokens, held[0].shape[1]), np.uint8)
            bounds = np.searchsorted(index, np.arange(len(held) + 1) * rows)
            takes = [
                (part, index[bounds[f] : bounds[f + 1]] - f * rows, batch[bounds[f] : bounds[f + 1]])
                for f, part in enumerate(held)
                if bounds[f] < bounds[f + 1]
            ]
            take_rows(takes, workers)
            yield batch.data.cast("B")

    held: list[np.ndarray] = []
    try:
        for view in files:
            header = fmt.parse_header(view, "raw")
            a, b = header.byte_range("states")
            held.append(np.frombuffer(view[a:b], np.uint8).reshape(-1, header.d_model * header.dtype.itemsize))
            if len(held) == window:
                yield from gather(held)
                held = []
        if held:
            yield from gather(held)
    finally:
        if workers is not None:
            workers.close()


def reader(case: dict[str, Any]) -> Iterable[Any]:
    import torch

    from activault import RCache, TokenLoader
    from activault.reading.options import ReadOptions
    from activault.storage import open_store

    name, range_size, buffer_size = case["reader"], case["range_size"], case["buffer_size"]
    options: dict[str, Any] = {"env": case["env"]} if case["env"] else {}
    if name.endswith(("-read", "-fresh")):  # local files read into buffers, not mapped
        options["map_reads"] = False
    store = open_store(case["root"], **options)
    if name.endswith("-1get"):
        range_size = 1 << 40  # larger than any file: one GET each
    # -fresh: buffers allocated per file and batch instead of recycled
    recycle = not name.endswith("-fresh")
    read = ReadOptions(buffer_size=buffer_size, store_options=options, range_size=range_size, recycle=recycle)
    uri = f"{case['root'].rstrip('/')}/run/hook"
    if name.startswith("raw"):
        files = 1 if name == "raw-one" else None
        gather = name.endswith("-gather")
        size, held = case["file_bytes"] + (1 << 20), case["window"] if gather else 1
        it = raw(store, "run/hook", files, buffer_size, range_size, size, held, mapped=name.startswith("raw-map"))
        next(it)  # its buffers: allocated and touched outside the timed part
        return raw_gather(it, case["window"], case["batch_tokens"]) if gather else it
    if name.startswith("rcache"):
        return RCache(uri, options=read)
    if name.startswith("tokens"):
        return TokenLoader(uri, batch_tokens=case["batch_tokens"], window=case["window"], options=read)
    if name == "original" and case["env"]:
        from bench.original import original_reader

        meta = json.loads(store.get_text("run/hook/metadata.json"))
        legacy = [(f"legacy/hook/{e.key.rsplit('/', 1)[-1]}", e.size) for e in store.list_dir("legacy/hook")[1]]
        return original_reader(case["env"], "bench", legacy, meta["shape"], torch.bfloat16, buffer_size)
    keys = [e.key for e in store.list_dir("legacy/hook")[1]]
    return (torch.load(io.BytesIO(bytes(store.get(k))), weights_only=True)["states"] for k in keys)


def nbytes(item: Any) -> int:
    if isinstance(item, memoryview):
        return item.nbytes
    return int(item.numel() * item.element_size())


def child(case: dict[str, Any]) -> dict[str, Any]:
    import activault.reading.rcache  # noqa: F401 - imports are not timed
    import activault.reading.tokens  # noqa: F401

    if case["cold"]:
        drop_cache(Path(case["root"]))
    elif case["store"] == "local":
        warm_cache(Path(case["root"]))
    base = rss()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if case["reader"].startswith("raw"):
        items = reader(case)  # its buffers are set up before the clock starts
        t0 = time.perf_counter()
    else:
        items = reader(case)  # construction (listing, metadata) is timed
    stamps, sizes = [], []
    for item in items:
        stamps.append(time.perf_counter() - t0)
        sizes.append(nbytes(item))
        del item
    seconds = stamps[-1]
    cpu = time.process_time() - cpu0
    total = sum(sizes)
    peak = rss("VmHWM")
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the original's worker
    return {
        "bytes": total,
        "seconds": seconds,
        "gb_s": total / seconds / 1e9,
        # After the first item: the rate a long run settles at, without the start (threads,
        # first buffers, the first file read alone).
        "steady_gb_s": (total - sizes[0]) / (seconds - stamps[0]) / 1e9 if len(stamps) > 1 else None,
        "first_s": stamps[0],
        "cpu_s_per_gb": cpu / (total / 1e9),
        "base_rss": base,
        "peak_rss": peak,
        "worker_peak_rss": workers,
    }


# -- the parent: data, servers, interleaved runs, the table --------------------------------------


def write_files(store: Any, n: int, rows: int, d: int) -> None:
    """A run of `n` files through the run writer (as collect writes them), and the same tensors as
    the original project's `.pt` files."""
    import torch

    from activault.vault import records
    from activault.vault.writer import RunWriter

    md = records.hook_metadata(
        run_name="run",
        hook="hook",
        d_model=d,
        dtype=torch.bfloat16,
        seq_length=SEQ,
        rows_per_file=rows,
        batch_size=rows,
        batches_per_upload=1,
        model="bench",
    )
    writer = RunWriter(store, records.RunRecord(run_name="run", hooks=["hook"], num_runs=1), {"hook": md})
    writer.join()
    g = torch.Generator().manual_seed(0)
    states = torch.randn(rows, SEQ, d, generator=g).to(torch.bfloat16)
    for k in range(n):
        ids = torch.randint(0, 50_000, (rows, SEQ), generator=g, dtype=torch.int32)
        pos = torch.arange(SEQ, dtype=torch.int32).expand(rows, SEQ).contiguous()
        # No statistics: the readers measured here do not normalise.
        writer.write_file({"hook": states}, ids, pos, tokens=rows * SEQ, data_state=None, stats={})
        buf = io.BytesIO()
        torch.save({"states": states, "input_ids": ids.long()}, buf)
        store.put(f"legacy/hook/{k:04d}--{k}.pt", buf.getbuffer())
    writer.finish(None, {})


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def summarise(runs: list[dict[str, Any]], file_bytes: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per case: median and range of GB/s, of the ratio to raw in the same repetition, first batch, RSS."""
    by: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["store"], r["cache"], r["reader"]), []).append(r)
    ref = {(r["store"], r["cache"], r["rep"], r["reader"]): r for r in runs}
    rows = []
    for (store, cache, name), rs in by.items():
        base = "raw-1get" if name.endswith("-1get") else "raw"
        if name == "raw-one":
            base = ""  # one file alone: the first-batch reference, not a throughput
        ratios = [
            r["gb_s"] / ref[(store, cache, r["rep"], base)]["gb_s"] for r in rs if (store, cache, r["rep"], base) in ref
        ]
        # A shuffling loader against raw reads + one gather (two copies), or mapped files + one
        # gather (local files, mapped by the readers: one copy).
        mapped = store == "local" and not name.endswith(("-read", "-fresh"))
        floor_name = "raw-map-gather" if mapped else "raw-gather"
        floor = [
            (r, ref[k]) for r in rs if name.startswith("tokens") and (k := (store, cache, r["rep"], floor_name)) in ref
        ]
        gathered = [r["gb_s"] / g["gb_s"] for r, g in floor]
        gathered_steady = [
            r["steady_gb_s"] / g["steady_gb_s"] for r, g in floor if r["steady_gb_s"] and g["steady_gb_s"]
        ]
        steady = [
            r["steady_gb_s"] / ref[(store, cache, r["rep"], base)]["steady_gb_s"]
            for r in rs
            if (store, cache, r["rep"], base) in ref
            and r["steady_gb_s"]
            and ref[(store, cache, r["rep"], base)]["steady_gb_s"]
        ]
        firsts = [
            r["first_s"] / ref[(store, cache, r["rep"], "raw-one")]["seconds"]
            for r in rs
            if (store, cache, r["rep"], "raw-one") in ref
        ]
        bound = None
        if name.startswith("tokens"):
            bound = (args.window + args.buffer_size + 1) * file_bytes + (512 << 20)
        rows.append(
            {
                "store": store,
                "cache": cache,
                "reader": name,
                "reps": len(rs),
                "gb_s": [r["gb_s"] for r in rs],
                "ratio_to_raw": ratios,
                "steady_gb_s": [r["steady_gb_s"] for r in rs if r["steady_gb_s"]],
                "steady_ratio_to_raw": steady,
                "ratio_to_raw_gather": gathered,
                "steady_ratio_to_raw_gather": gathered_steady,
                "first_s": [r["first_s"] for r in rs],
                "first_to_one_file": firsts,
                "cpu_s_per_gb": [r["cpu_s_per_gb"] for r in rs],
                "peak_rss_mib": [r["peak_rss"] / 2**20 for r in rs],
                "base_rss_mib": [r["base_rss"] / 2**20 for r in rs],
                "worker_peak_rss_mib": [r["worker_peak_rss"] / 2**20 for r in rs],
                "rss_bound_mib": bound / 2**20 if bound else None,
            }
        )
    order = [*READERS["local"], *READERS["moto"], *READERS["proxy"]]
    return sorted(rows, key=lambda r: (r["store"], r["cache"] != "warm", order.index(r["reader"])))


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.0f} ({min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f})"


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("GB/s", "x raw", "steady GB/s", "steady x raw", "first (ms)", "first/1 file", "CPU s/GB", "steady x gather")
    print(f"{'store':6} {'cache':5} {'reader':13} " + " ".join(f"{c:>17}" for c in cols) + " peak RSS MiB  bound")
    for r in rows:
        cells = [
            spread(r[k]) if r[k] else "-"
            for k in (
                "gb_s",
                "ratio_to_raw",
                "steady_gb_s",
                "steady_ratio_to_raw",
                "first_s",
                "first_to_one_file",
                "cpu_s_per_gb",
                "steady_ratio_to_raw_gather",
            )
        ]
        cells[4] = ms(r["first_s"])
        bound = f"{r['rss_bound_mib']:.0f}" if r["rss_bound_mib"] else ""
        print(
            f"{r['store']:6} {r['cache']:5} {r['reader']:13} "
            + " ".join(f"{c:>17}" for c in cells)
            + f" {statistics.median(r['peak_rss_mib']):12.0f} {bound:>6}"
        )


def run_child(case: dict[str, Any]) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bench.read", "--child", json.dumps(case)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case['store']}/{case['reader']} failed:\n{out.stderr[-3000:]}")
    return {**case, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--mib", type=int, default=64, help="states per file")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--buffer-size", type=int, default=2)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--stores", default="local,moto,proxy")
    ap.add_argument("--readers", default="", help="comma-separated subset of: " + ", ".join(READERS["local"]))
    ap.add_argument("--cache", default="warm,cold", help="local store page cache states")
    ap.add_argument("--rate-mb", type=float, default=90, help="proxy: MB/s per connection")
    ap.add_argument("--latency-ms", type=float, default=30, help="proxy: first-byte latency")
    ap.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from activault.storage import LocalStore, open_store
    from support.s3servers import MotoServer, ThrottleProxy

    rows = max(1, (args.mib << 20) // (SEQ * args.d * 2))
    file_bytes = rows * SEQ * (args.d * 2 + 8)
    wanted = set(args.readers.split(",")) if args.readers else None
    tmp = Path(tempfile.mkdtemp(prefix="activault-bench-", dir=os.environ.get("BENCH_DIR")))
    server, proxy = None, None
    common = {
        "range_size": None,  # the readers' default plan (fetch.range_step)
        "buffer_size": args.buffer_size,
        "window": args.window,
        "batch_tokens": args.batch_tokens,
        "file_bytes": file_bytes,
    }
    cases: list[dict[str, Any]] = []
    try:
        stores = args.stores.split(",")
        if "local" in stores:
            write_files(LocalStore(tmp, fsync=False), args.files, rows, args.d)
            for cache in args.cache.split(","):
                cases += [
                    {
                        "store": "local",
                        "cache": cache,
                        "cold": cache == "cold",
                        "root": str(tmp),
                        "env": None,
                        "reader": r,
                        **common,
                    }
                    for r in READERS["local"]
                ]
        if "moto" in stores or "proxy" in stores:
            server = MotoServer().start()
            server.create_bucket("bench")
            write_files(open_store("s3://bench", env=server.env()), args.files, rows, args.d)
            if "moto" in stores:
                cases += [
                    {
                        "store": "moto",
                        "cache": "-",
                        "cold": False,
                        "root": "s3://bench",
                        "env": server.env(),
                        "reader": r,
                        **common,
                    }
                    for r in READERS["moto"]
                ]
            if "proxy" in stores:
                proxy = ThrottleProxy(server.url, rate=args.rate_mb * 1e6, latency_s=args.latency_ms / 1e3).__enter__()
                through = open_store("s3://bench", env=server.env(proxy.url))
                for e in through.list():  # each object fetched from moto before any run is timed
                    through.get_range(e.key, 0, 1)
                cases += [
                    {
                        "store": "proxy",
                        "cache": "-",
                        "cold": False,
                        "root": "s3://bench",
                        "env": server.env(proxy.url),
                        "reader": r,
                        **common,
                    }
                    for r in READERS["proxy"]
                ]
        if wanted:
            gathers = ["raw-gather", "raw-map-gather"] if any(w.startswith("tokens") for w in wanted) else []
            kept = {"raw", "raw-one", *gathers}
            cases = [c for c in cases if c["reader"] in wanted or c["reader"] in kept]
        runs = []
        for rep in range(args.reps):
            random.Random(rep).shuffle(cases)  # interleaved: no reader always runs first or after another
            for case in cases:
                runs.append({**run_child(case), "rep": rep})
                print(
                    f"rep {rep} {case['store']:5} {case['cache']:4} {case['reader']:13} {runs[-1]['gb_s']:.2f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if proxy is not None:
            proxy.__exit__()
        if server is not None:
            server.stop()
    table = summarise(runs, file_bytes, args)
    print(
        f"{args.files} files x {file_bytes / 2**20:.0f} MiB (bf16 [{rows}, {SEQ}, {args.d}] + ids, positions), "
        f"buffer_size={args.buffer_size}, window={args.window}, {args.reps} reps, {os.cpu_count()} CPUs; "
        "median (min-max)"
    )
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"args": {**vars(args), "out": str(args.out)}, "file_bytes": file_bytes, "rows": table, "runs": runs}
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
