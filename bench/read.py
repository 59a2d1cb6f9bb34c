"""Read throughput: raw bytes (the limit) vs RCache, an original-style torch.load baseline, TokenLoader.

Same files on a local folder and on a moto S3 server. Prints a table and writes bench/out/read.json.
    python -m bench.read [--files 8] [--mib 64] [--d 2048]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from activault.reading import rcache as reader
from activault.reading.rcache import RCache
from activault.reading.tokens import TokenLoader
from activault.storage import LocalStore, Store, open_store
from activault.vault import megabatch as fmt
from activault.vault import records
from support.s3servers import MotoServer

OUT = Path(__file__).parent / "out" / "read.json"
SEQ = 1024


class PeakRSS:
    """Peak resident memory above the level at start, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def write_files(store: Store, n: int, rows: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    states = torch.randn(rows, SEQ, d, generator=g).to(torch.bfloat16)
    for k in range(n):
        ids = torch.randint(0, 50_000, (rows, SEQ), generator=g, dtype=torch.int32)
        pos = torch.arange(SEQ, dtype=torch.int32).expand(rows, SEQ).contiguous()
        store.put(f"run/hook/{records.file_name(0, k)}", fmt.encode({"states": states, "input_ids": ids, "positions": pos}, {}))
        buf = io.BytesIO()
        torch.save({"states": states, "input_ids": ids.long()}, buf)
        store.put(f"legacy/hook/{k:04d}--{k}.pt", buf.getbuffer())
    md = records.hook_metadata(run_name="run", hook="hook", d_model=d, dtype=torch.bfloat16, seq_length=SEQ,
                               rows_per_file=rows, batch_size=rows, batches_per_upload=1, model="bench")
    records.write_record(store, "run/hook/metadata.json", md)


def measure(name: str, make: Callable[[], Iterable[Any]], count: Callable[[Any], int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, nbytes = None, 0
    with PeakRSS() as rss:
        for item in make():
            if first is None:
                first = time.perf_counter() - t0
            nbytes += count(item)
    total = time.perf_counter() - t0
    return {"name": name, "bytes": nbytes, "seconds": total, "gb_s": nbytes / total / 1e9,
            "first_batch_s": first, "peak_rss_mib": rss.mib}


def raw_ranged(store: Store, keys: list[tuple[str, int]], buffer_size: int, range_size: int) -> Iterable[memoryview]:
    """The files' bytes with the reader's own client: parallel ranges, `buffer_size` files ahead."""
    stop = threading.Event()
    with ThreadPoolExecutor(buffer_size) as files, ThreadPoolExecutor(reader.RANGE_WORKERS) as ranges:
        futures = [files.submit(reader._fetch, store, k, size, k, stop, ranges, False, range_size) for k, size in keys[:buffer_size]]
        for i in range(len(keys)):
            if i + buffer_size < len(keys):
                k, size = keys[i + buffer_size]
                futures.append(files.submit(reader._fetch, store, k, size, k, stop, ranges, False, range_size))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]


def decoded(store: Store, keys: list[tuple[str, int]], args: argparse.Namespace, range_size: int,
            verify: bool) -> Iterable[torch.Tensor]:  # fmt: skip
    """Files fetched and decoded as the reader does (header first, then the body, decoded on the
    file's own thread, `buffer_size` files ahead), with or without checking their checksums."""
    stop = threading.Event()

    def load(key: str, size: int, ranges: ThreadPoolExecutor) -> torch.Tensor:
        header = fmt.fetch_header(store, key, size)
        buf = reader._fetch(store, key, size, key, stop, ranges, False, range_size)
        return fmt.decode(buf, key, header, verify_checksums=verify).states

    with ThreadPoolExecutor(args.buffer_size) as files, ThreadPoolExecutor(reader.RANGE_WORKERS) as ranges:
        futures = [files.submit(load, k, size, ranges) for k, size in keys[: args.buffer_size]]
        for i in range(len(keys)):
            if i + args.buffer_size < len(keys):
                futures.append(files.submit(load, *keys[i + args.buffer_size], ranges))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]


def original_style(store: Store, keys: list[str]) -> Iterable[dict[str, torch.Tensor]]:
    """The original's loop: download a whole torch.save'd megabatch, then torch.load it."""
    for k in keys:
        yield torch.load(io.BytesIO(bytes(store.get(k))), weights_only=True)


def bench_store(label: str, uri: str, options: dict[str, Any], args: argparse.Namespace, ranges: list[int]) -> list[dict[str, Any]]:
    store = open_store(uri, **options)
    keys = [(e.key, e.size) for e in store.list("run/hook") if e.key.endswith(fmt.SUFFIX)]
    legacy = [e.key for e in store.list("legacy/hook")]
    hook_uri = f"{uri.rstrip('/')}/run/hook"
    nbytes: Callable[[torch.Tensor], int] = lambda t: t.numel() * t.element_size()  # noqa: E731
    results = []
    for rs in ranges:
        how = f"{rs >> 20} MiB ranges" if rs < 1 << 40 else "1 GET/file"
        raw = measure(f"raw bytes, {how} (limit)", lambda rs=rs: raw_ranged(store, keys, args.buffer_size, rs), lambda b: b.nbytes)
        results.append(raw)
        common = {"buffer_size": args.buffer_size, "store_options": options, "range_size": rs}
        results.append(measure(f"RCache, {how}", lambda c=common: RCache(hook_uri, **c), nbytes))
        results.append(measure(f"TokenLoader, {how}", lambda c=common: TokenLoader(hook_uri, batch_tokens=args.batch_tokens, window=2, **c), nbytes))
        for r in results[-3:]:
            r["ratio_to_raw"] = r["gb_s"] / raw["gb_s"]
        # Checksums at read: the same fetch and decode with and without hashing every tensor, in
        # pairs whose order alternates, so drift on a shared machine hits both sides alike.
        pairs = []
        for rep in range(args.checksum_reps):
            got = {}
            for verify in (False, True) if rep % 2 == 0 else (True, False):
                name = f"decode{' + checksums' if verify else ''}, {how}"
                got[verify] = measure(name, lambda rs=rs, v=verify: decoded(store, keys, args, rs, v), nbytes)
            pairs.append((got[False], got[True]))
        pairs.sort(key=lambda pair: pair[1]["gb_s"] / pair[0]["gb_s"])
        plain, checked = pairs[len(pairs) // 2]  # the median pair
        plain["ratio_to_raw"], checked["ratio_to_raw"] = plain["gb_s"] / raw["gb_s"], checked["gb_s"] / raw["gb_s"]
        checked["ratio_to_unverified"] = checked["gb_s"] / plain["gb_s"]
        checked["ratios_to_unverified"] = [round(c["gb_s"] / p["gb_s"], 3) for p, c in pairs]
        results += [plain, checked]
    results.append(measure("original-style torch.load", lambda: original_style(store, legacy), lambda b: nbytes(b["states"])))
    best = max(r["gb_s"] for r in results if r["name"].startswith("raw"))
    results[-1]["ratio_to_raw"] = results[-1]["gb_s"] / best
    for r in results:
        r["store"] = label
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64, help="states per file")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--buffer-size", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--checksum-reps", type=int, default=5, help="pairs of reads with and without checksums")
    args = ap.parse_args()
    rows = max(1, (args.mib << 20) // (SEQ * args.d * 2))
    tmp = Path(tempfile.mkdtemp(prefix="activault-bench-"))
    results: list[dict[str, Any]] = []
    server = None
    try:
        write_files(LocalStore(tmp, fsync=False), args.files, rows, args.d)
        results += bench_store("local", str(tmp), {}, args, [reader.RANGE_SIZE])
        if not args.no_s3:
            server = MotoServer().start()
            server.create_bucket("bench")
            env = server.env()
            write_files(open_store("s3://bench", env=env), args.files, rows, args.d)
            results += bench_store("moto S3", "s3://bench", {"env": env}, args, [reader.RANGE_SIZE, 1 << 40])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()
    file_mib = rows * SEQ * args.d * 2 / 2**20
    print(f"{args.files} files x {file_mib:.0f} MiB bf16 [{rows}, {SEQ}, {args.d}], buffer_size={args.buffer_size}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'store':8} {'reader':34} {'GB/s':>6} {'x raw':>6} {'first (s)':>9} {'peak RSS (MiB)':>14}")
    for r in results:
        print(f"{r['store']:8} {r['name']:34} {r['gb_s']:6.2f} {r['ratio_to_raw']:6.2f} {r['first_batch_s']:9.3f} {r['peak_rss_mib']:14.0f}")
    for r in results:
        if "ratio_to_unverified" in r:
            print(f"{r['store']:8} checksums at read ({r['name'].split(', ')[1]}): {r['ratio_to_unverified']:.3f}x "
                  f"unverified, median of {r['ratios_to_unverified']} (goal >= 0.85)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"files": args.files, "file_mib": file_mib, "shape": [rows, SEQ, args.d],
                               "buffer_size": args.buffer_size, "cpus": os.cpu_count(), "results": results}, indent=1))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
