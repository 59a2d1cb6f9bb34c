"""Collection throughput against its limits, measured in one run on one machine.

1. tokens/s of the hooked forward pass alone (same batches, same truncated model) vs a full
   collection to the local store (data, capture, cleaning, statistics, background writes): goal >= 0.95.
2. The writer alone (synthetic megabatches through Writer + format.encode, 4 threads) vs plain
   writes of the same bytes to the same disk by 4 threads (same fsync, page cache dropped after it,
   and rename per file): goal >= 0.9. The host buffers are filled before the clock starts: that
   copy is the collect loop's, counted in (1).
3. Checksums at write: encode + store.put of the same megabatches with and without a checksum of
   each tensor in the header: goal >= 0.95 (checksums cost <= 5%).

Each comparison runs its two sides back to back, `--reps` times; figures are medians (min-max).
In (1) each collection is compared with the mean of the forward runs just before and after it, and
with a control between them: the forward pass alone while plain writes store the same bytes at the
same points (the machine's own cost of writing, without any of activault's work).

The ratios carry the machine's noise: here two runs of the forward pass alone a minute apart can
differ by a third. So (1) also accounts for each run's time, which that noise barely moves: the
main thread's time outside the model's calls, and the CPU time of every thread the run started
(data, writers, records). On a CPU collection, whose forward pass keeps every core busy, each of
those seconds is taken from the model, so 1 - their share of the run is what the ratio comes to
without the noise. The main thread's share is split further (MAIN_PARTS: statistics, copies out of
the hook, ids and positions, waiting for a staging buffer, handing files to the writer, the rest);
the background threads' CPU in encode's norms and checksums is split out too (THREAD_PARTS).
The model runs on `--torch-threads` threads (2) on both sides.

Usage: python -m bench.collect [--out bench/out/collect.json] [--reps 5] [--quick] [--torch-threads 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from activault.collection import collector as collector_module
from activault.collection.collector import Collector
from activault.collection.hooks import Capture, hook_dims, resolve_hooks
from activault.collection.model import keep_freed_memory, load_model, load_skeleton, load_tokenizer, stored_dtype
from activault.collection.packing import iter_batches
from activault.collection.pipeline import collect
from activault.config import parse_config
from activault.storage import LocalStore
from activault.tools.tiny import build_tiny
from activault.vault import megabatch
from activault.vault import writer as run_writer
from activault.vault.megabatch import encode
from activault.vault.records import file_name
from activault.vault.stats import RunningStats
from activault.vault.writer_threads import StagingBuffers, Writer

HOOKS = ["models.layers.3.post", "models.layers.5.mlp.post"]
# The main thread's work outside the model, timed call by call (wall seconds, outermost call only);
# a name the collector no longer has is left out (`Accounting.missing`), its time in the rest.
MAIN_PARTS: dict[str, tuple[Any, str]] = {
    "statistics": (RunningStats, "update"),
    "copies out of the hook": (Collector, "_copy"),
    "ids and positions": (collector_module, "stored_tokens"),
    "waiting for a staging buffer": (StagingBuffers, "acquire"),
    "handing files to the writer": (Collector, "_submit"),
}
# The background threads' work, timed call by call in CPU seconds (time.thread_time: a writer
# thread waits on the disk and on the GIL) on any thread but the main one, outermost call only.
THREAD_PARTS: dict[str, tuple[Any, str]] = {
    "norms in encode": (megabatch, "token_norms"),
    "checksums in encode": (megabatch, "checksum"),
}


def forward_alone(cfg, batches, writes: Path | None = None) -> float:
    """Tokens/s of the hooked, truncated forward over pre-built batches (padding not counted, as in
    a collection's figure: counting it credited the forward pass with ~3% more tokens here). The
    clock starts on a freshly loaded model, as a collection's does: both count the first call.

    With `writes` (a folder), the control: after every `batches_per_upload` batches, one file per
    hook of a megabatch's encoded size is written there plainly by the writer's threads. As in a
    collection, at most `max_pending + 1` megabatches are held (a new one waits for the oldest's
    writes), and the clock stops once the last is on disk."""
    tc, uc = cfg.transformer_config, cfg.upload_config
    skeleton = load_skeleton(tc)
    specs = resolve_hooks(skeleton, uc.hooks)
    model = load_model(tc, specs)
    dtype = stored_dtype(tc, skeleton.config)
    files = _megabatch_bytes(cfg, hook_dims(skeleton, specs), dtype) if writes else {}
    pool = ThreadPoolExecutor(uc.write_threads, thread_name_prefix="plain-write")
    held: list[list[Future[None]]] = []  # per megabatch handed over, its writes
    with Capture(model, specs) as cap, pool:
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            if writes and i % uc.batches_per_upload == 0 and len(held) > uc.max_pending:
                for f in held[len(held) - uc.max_pending - 1]:  # its buffer, free once written
                    f.result()
            cap(b.input_ids, b.position_ids, b.segment_ids)
            if writes and ((i + 1) % uc.batches_per_upload == 0 or i + 1 == len(batches)):
                held.append([pool.submit(plain_put, writes / f"{h}-{i}", blob) for h, blob in files.items()])
        for f in (f for fs in held for f in fs):
            f.result()
        dt = time.perf_counter() - t0
    return sum(real_tokens(b) for b in batches) / dt


def _megabatch_bytes(cfg, dims: dict[str, int], dtype: torch.dtype) -> dict[str, bytes]:
    """Per hook, a full megabatch file's bytes (random states: a disk may store zeros for less)."""
    rows, seq = cfg.rows_per_file, cfg.data_config.seq_length
    ids = torch.zeros(rows, seq, dtype=torch.int32)
    return {
        h: b"".join(encode({"states": torch.randn(rows, seq, d).to(dtype), "input_ids": ids, "positions": ids}, {}))
        for h, d in dims.items()
    }


def plain_put(path: Path, blob: bytes) -> None:
    """A file written as LocalStore writes one, with none of its checks: temp name, write, fsync,
    page cache dropped, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp, path)


class Accounting:
    """While active: the wall time spent inside the model's calls (`Capture.__call__`), and the CPU
    time of each thread that ends after the first of them, read as it ends, summed per thread name
    without its numbers. What runs before the first call (loading the weights, the shape probe on
    the meta device) is before a run's clock starts and not counted. OpenMP's workers are not
    Python threads and are not counted: they are the forward pass."""

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, cpu_clock: Callable[[], float] = time.thread_time
    ) -> None:
        self.clock, self.cpu_clock = clock, cpu_clock  # cpu_clock: the calling thread's CPU seconds
        self.forward = 0.0
        self.started = False  # the model's first real call has begun
        self.threads: dict[str, float] = defaultdict(float)
        self.parts: dict[str, float] = defaultdict(float)  # MAIN_PARTS' wall seconds on the main thread
        self.thread_parts: dict[str, float] = defaultdict(float)  # THREAD_PARTS' CPU seconds, other threads
        self._busy = threading.local()  # in a THREAD_PARTS call on this thread
        self._inside = False
        self.missing: list[str] = []  # MAIN_PARTS the collector no longer has

    @contextmanager
    def active(self) -> Iterator[Accounting]:
        call, run = Capture.__call__, threading.Thread.run

        def timed_call(cap, input_ids, *args):
            if input_ids.device.type == "meta":
                return call(cap, input_ids, *args)
            self.started = True
            t0 = self.clock()
            try:
                return call(cap, input_ids, *args)
            finally:
                self.forward += self.clock() - t0

        def timed_run(thread: threading.Thread) -> None:
            try:
                run(thread)
            finally:
                if self.started:
                    self.threads[re.sub(r"[-_]\d+", "", thread.name)] += time.thread_time()

        def timed_part(part: str, fn: Callable[..., object]) -> Callable[..., object]:
            @functools.wraps(fn)
            def timed(*args: object, **kwargs: object) -> object:
                if not self.started or self._inside or threading.current_thread() is not threading.main_thread():
                    return fn(*args, **kwargs)
                self._inside = True
                t0 = self.clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._inside = False
                    self.parts[part] += self.clock() - t0

            return timed

        def timed_thread_part(part: str, fn: Callable[..., object]) -> Callable[..., object]:
            @functools.wraps(fn)
            def timed(*args: object, **kwargs: object) -> object:
                main = threading.current_thread() is threading.main_thread()
                if not self.started or main or getattr(self._busy, "on", False):
                    return fn(*args, **kwargs)
                self._busy.on = True
                t0 = self.cpu_clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._busy.on = False
                    self.thread_parts[part] += self.cpu_clock() - t0

            return timed

        every = {**MAIN_PARTS, **THREAD_PARTS}
        originals = {part: getattr(owner, name) for part, (owner, name) in every.items() if hasattr(owner, name)}
        self.missing = sorted(set(every) - set(originals))
        Capture.__call__, threading.Thread.run = timed_call, timed_run  # type: ignore[method-assign,assignment]
        for part, fn in originals.items():
            timer = timed_part if part in MAIN_PARTS else timed_thread_part
            setattr(*every[part], timer(part, fn))
        try:
            yield self
        finally:
            Capture.__call__, threading.Thread.run = call, run  # type: ignore[method-assign]
            for part, fn in originals.items():
                setattr(*every[part], fn)

    def shares(self, seconds: float) -> dict[str, float]:
        """Per part, its share of a run of `seconds`: "main" is the main thread outside the model."""
        parts = {"main": seconds - self.forward, **self.threads}
        return {k: v / seconds for k, v in sorted(parts.items())}

    def breakdown(self, seconds: float) -> dict[str, float]:
        """The main thread's share outside the model, split into MAIN_PARTS and the rest."""
        rest = seconds - self.forward - sum(self.parts.values())
        return {**{k: self.parts.get(k, 0.0) / seconds for k in MAIN_PARTS}, "rest of the main thread": rest / seconds}

    def thread_breakdown(self, seconds: float) -> dict[str, float]:
        """THREAD_PARTS' CPU, each as a share of a run of `seconds` (part of the threads' shares)."""
        return {k: self.thread_parts.get(k, 0.0) / seconds for k in THREAD_PARTS}


def real_tokens(batch) -> int:
    """The batch's stored tokens that are not padding: what a collection's tokens/s counts."""
    return int((batch.doc_positions[batch.keep] >= 0).sum())


def bench_collect(work: Path, quick: bool, reps: int) -> dict:
    model_dir = work / "model"
    build_tiny(model_dir, "llama", layers=8, d=512)
    # The demo corpus three times over: 54 full batches, so the start and the last file's write
    # (~0.1 s) weigh on the ratio as little as in a long run, not ~2% as over 18 batches.
    n = 8 if quick else 54
    demo = resources.files("activault").joinpath("demo_corpus.jsonl").read_text()
    corpus = str(work / "corpus.jsonl")
    Path(corpus).write_text(demo * (3 * n // 54 + 1))
    raw = {
        "run_name": "bench",
        "transformer_config": {"model_name": str(model_dir), "dtype": "float32", "device": "cpu"},
        "data_config": {"data_key": corpus, "n_batches": n, "seq_length": 256, "batch_size": 8},
        "upload_config": {"batches_per_upload": 2, "hooks": HOOKS},
    }
    cfg = parse_config(raw)
    # A CPU collection keeps freed memory for reuse (model.keep_freed_memory, process-wide): set
    # here, so the forward pass alone runs under the same allocator, before and after collections.
    keep_freed_memory()
    tok = load_tokenizer(cfg.transformer_config)
    batches = list(iter_batches(cfg.data_config, tok))[:n]  # fewer where the corpus runs out
    tokens = sum(real_tokens(b) for b in batches)

    def collection(i: int, checksums: bool) -> float:
        folder = work / f"vault{i}-{checksums}"
        # The same collection writing no checksums: what they cost the whole pipeline.
        run_writer.encode = encode if checksums else functools.partial(encode, checksums=False)
        try:
            with Accounting().active() as acc:
                r = collect(cfg, storage=str(folder), show_progress=False)
        finally:
            run_writer.encode = encode
        if checksums:
            accounts["collection"].append(acc.shares(r.seconds))
            breakdowns.append(acc.breakdown(r.seconds))
            thread_breakdowns.append(acc.thread_breakdown(r.seconds))
        shutil.rmtree(folder)
        if r.tokens != tokens:  # both sides must count the same tokens of the same batches
            raise RuntimeError(f"the collection stored {r.tokens} tokens, the forward pass counted {tokens}")
        written["collection"] = r.bytes_written
        waits.append(r.storage_wait / r.seconds)
        return r.tokens / r.seconds

    def control(i: int) -> float:
        folder = work / f"plain{i}"
        try:
            with Accounting().active() as acc:
                rate = forward_alone(cfg, batches, writes=folder)
            written["control"] = sum(f.stat().st_size for f in folder.iterdir())
            accounts["control"].append(acc.shares(tokens / rate))
            return rate
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    written: dict[str, int] = {}
    waits: list[float] = []  # per collection, the share of its time the model waited for storage
    accounts: dict[str, list[dict[str, float]]] = {"collection": [], "control": []}  # per run, Accounting.shares
    breakdowns: list[dict[str, float]] = []  # per collection, Accounting.breakdown
    thread_breakdowns: list[dict[str, float]] = []  # per collection, Accounting.thread_breakdown

    # The runs of each rep sit between two runs of the forward pass alone and are compared with
    # their mean: the speed of a shared machine drifts by several percent over a minute, and a
    # drift that is linear over the rep cancels. The order within a rep rotates, so each side is
    # as often next to the earlier forward run as to the later one.
    sides: dict[str, Callable[[int], float]] = {
        "full": functools.partial(collection, checksums=True),
        "nosums": functools.partial(collection, checksums=False),
        "plain": control,
    }
    got: dict[str, list[float]] = {k: [] for k in sides}
    alone = [forward_alone(cfg, batches)]
    for i in range(reps):
        order = list(sides)[i % 3 :] + list(sides)[: i % 3]
        for k in order:
            got[k].append(sides[k](i))
        alone.append(forward_alone(cfg, batches))
    # The control must write what a collection writes (its headers differ by a few names).
    if abs(written["control"] / written["collection"] - 1) > 0.01:
        raise RuntimeError(f"the control wrote {written['control']:,} bytes, a collection {written['collection']:,}")
    mids = [(x + y) / 2 for x, y in zip(alone[:-1], alone[1:], strict=True)]
    ratios = [f / m for f, m in zip(got["full"], mids, strict=True)]
    plain = [p / m for p, m in zip(got["plain"], mids, strict=True)]
    over_plain = [f / p for f, p in zip(got["full"], got["plain"], strict=True)]
    own = [sum(a.values()) for a in accounts["collection"]]  # activault's time and the writes'
    writes = [sum(a.values()) for a in accounts["control"]]  # the plain writes' own time
    drift = [y / x for x, y in zip(alone[:-1], alone[1:], strict=True)]
    return {
        "forward_tok_s": statistics.median(alone),
        "collect_tok_s": statistics.median(got["full"]),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "plain_writes_tok_s": statistics.median(got["plain"]),
        "plain_writes_ratio": statistics.median(plain),
        "plain_writes_ratio_range": [min(plain), max(plain)],
        "collect_over_plain_writes": statistics.median(over_plain),
        "collect_over_plain_writes_range": [min(over_plain), max(over_plain)],
        "tokens": tokens,
        "batches": len(batches),
        "collect_no_checksums_tok_s": statistics.median(got["nosums"]),
        "checksum_ratio": statistics.median(f / x for f, x in zip(got["full"], got["nosums"], strict=True)),
        "storage_wait_share": [min(waits), statistics.median(waits), max(waits)],
        # Counterparts of the ratios that the machine's noise barely moves: 1 - the share of a run
        # not spent in the model.
        "accounted_ratio": 1 - statistics.median(own),
        "accounted_ratio_range": [1 - max(own), 1 - min(own)],
        "accounted_control_ratio": 1 - statistics.median(writes),
        "accounted_shares": {
            side: {k: statistics.median(a.get(k, 0.0) for a in runs) for k in sorted(set().union(*runs))}
            for side, runs in accounts.items()
        },
        # The main thread's share split up: statistics, copies out of the hook, ...
        "main_breakdown": {k: statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]},
        # The background threads' CPU in encode's norms and checksums (within the threads' shares).
        "thread_breakdown": {k: statistics.median(b[k] for b in thread_breakdowns) for k in thread_breakdowns[0]},
        # The machine's own noise: each run of the forward pass alone over the one before it.
        "forward_run_to_run": [min(drift), max(drift)],
        "runs_tok_s": {"forward": alone, **got},  # in order; each rep between two forward runs
        "model": "llama d=512, 8 layers (2 hooks, truncated after block 5), fp32, CPU",
    }


def bench_writer(work: Path, quick: bool, reps: int) -> dict:
    # 48 files of 32 MiB: at ~1.8 GB/s (written pages leave the cache) 16 took ~0.3 s, too short here.
    files, rows, seq, d = (6 if quick else 48), 16, 256, 4096
    states = torch.randn(rows, seq, d).to(torch.bfloat16)
    ids = torch.randint(0, 50000, (rows, seq), dtype=torch.int32)
    pos = torch.arange(seq, dtype=torch.int32).repeat(rows, 1)
    parts = encode({"states": states, "input_ids": ids, "positions": pos}, {"format": "activault"})
    blob = b"".join(parts)
    nbytes = len(blob) * files

    def plain(root: Path) -> float:
        root.mkdir(parents=True)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:  # the writer's concurrency
            list(pool.map(lambda k: plain_put(root / f"{k}.bin", blob), range(files)))
        return nbytes / (time.perf_counter() - t0)

    def through_writer(root: Path) -> float:
        store = LocalStore(root)
        writer = Writer(store, threads=4)
        pool = StagingBuffers(states.shape, states.dtype, count=3)
        filled = [pool.acquire() for _ in range(3)]
        for buf in filled:  # the collect loop's copy into a host buffer: its cost, not the writer's
            buf.copy_(states)  # (it is in collection / forward); it took ~25% of this run here
            pool.release(buf)
        t0 = time.perf_counter()
        for k in range(files):
            buf = pool.acquire(writer.check)
            p = encode({"states": buf, "input_ids": ids, "positions": pos}, {"format": "activault"})
            writer.write(f"run/h/{file_name(0, k)}", p, on_done=functools.partial(pool.release, buf))
        writer.close()
        return nbytes / (time.perf_counter() - t0)

    plain_r: list[float] = []
    writer_r: list[float] = []
    for i in range(reps):  # each side first in every other pair
        for side in ("plain", "writer") if i % 2 == 0 else ("writer", "plain"):
            folder = work / f"{side}{i}"
            (plain_r if side == "plain" else writer_r).append((plain if side == "plain" else through_writer)(folder))
            shutil.rmtree(folder)
    a, b = statistics.median(plain_r), statistics.median(writer_r)
    ratios = [w / p for w, p in zip(writer_r, plain_r, strict=True)]
    return {
        "plain_MB_s": a / 1e6,
        "writer_MB_s": b / 1e6,
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "bytes": nbytes,
    }


def bench_checksums(work: Path, quick: bool) -> dict:
    """Megabatches written (encode + atomic put, fsync) with and without checksums, interleaved."""
    files, rows, seq, d = (6 if quick else 16), 16, 256, 4096  # 32 MiB of bf16 states per file
    tensors = {
        "states": torch.randn(rows, seq, d).to(torch.bfloat16),
        "input_ids": torch.randint(0, 50000, (rows, seq), dtype=torch.int32),
        "positions": torch.arange(seq, dtype=torch.int32).repeat(rows, 1),
    }
    nbytes = sum(p.nbytes for p in encode(tensors, {})) * files

    def write(root: Path, checksums: bool) -> float:
        store = LocalStore(root)
        t0 = time.perf_counter()
        for k in range(files):
            store.put(f"run/h/{file_name(0, k)}", encode(tensors, {}, checksums=checksums))
        return nbytes / (time.perf_counter() - t0)

    def encode_only(checksums: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(files):
            encode(tensors, {}, checksums=checksums)
        return nbytes / (time.perf_counter() - t0)

    with_r, without_r, ratios = [], [], []
    for i in range(5):  # pairs, alternating which goes first: disk drift hits both sides
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {c: write(work / f"sums-{c}-{i}", c) for c in order}
        without_r.append(got[False])
        with_r.append(got[True])
        ratios.append(got[True] / got[False])
    hash_s = (1 / encode_only(True) - 1 / encode_only(False)) * nbytes  # seconds spent hashing
    a, b = statistics.median(without_r), statistics.median(with_r)
    return {
        "without_MB_s": a / 1e6,
        "with_MB_s": b / 1e6,
        "ratio": statistics.median(ratios),
        "bytes": nbytes,
        "hash_GB_s": nbytes / max(hash_s, 1e-9) / 1e9,
        "hash_share_of_write": hash_s / (nbytes / a),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/collect.json")
    ap.add_argument("--quick", action="store_true", help="fewer batches and files")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=2, help="the model's threads, on both sides")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        c = bench_collect(work, args.quick, args.reps)
        w = bench_writer(work, args.quick, args.reps)
        s = bench_checksums(work, args.quick)
    print(f"forward alone     {c['forward_tok_s']:>10,.0f} tok/s")
    lo, hi = c["ratio_range"]
    print(
        f"full collection   {c['collect_tok_s']:>10,.0f} tok/s   "
        f"ratio {c['ratio']:.3f} ({lo:.3f}-{hi:.3f}; goal >= 0.95)"
    )
    print(
        f"  no checksums    {c['collect_no_checksums_tok_s']:>10,.0f} tok/s   with/without {c['checksum_ratio']:.3f} "
        "(goal >= 0.95)"
    )
    lo, hi = c["plain_writes_ratio_range"]
    print(
        f"forward + plain writes of the same bytes {c['plain_writes_tok_s']:>10,.0f} tok/s   "
        f"ratio {c['plain_writes_ratio']:.3f} ({lo:.3f}-{hi:.3f}: the disk's own cost)"
    )
    lo, hi = c["collect_over_plain_writes_range"]
    print(f"  collection / (forward + plain writes) {c['collect_over_plain_writes']:.3f} ({lo:.3f}-{hi:.3f})")
    lo, mid, hi = c["storage_wait_share"]
    print(f"  the model waited for storage {mid:.2%} of a collection ({lo:.2%}-{hi:.2%})")
    lo, hi = c["forward_run_to_run"]
    print(f"  the machine's noise: forward alone, each run over the one before, {lo:.3f}-{hi:.3f}")
    lo, hi = c["accounted_ratio_range"]
    parts = ", ".join(f"{k} {v:.2%}" for k, v in c["accounted_shares"]["collection"].items())
    print(f"accounted: collection {c['accounted_ratio']:.3f} ({lo:.3f}-{hi:.3f}; goal >= 0.95): {parts}")
    parts = ", ".join(f"{k} {v:.2%}" for k, v in c["main_breakdown"].items())
    print(f"  main thread outside the model: {parts}")
    parts = ", ".join(f"{k} {v:.2%}" for k, v in c["thread_breakdown"].items())
    print(f"  of the threads' CPU: {parts}")
    parts = ", ".join(f"{k} {v:.2%}" for k, v in c["accounted_shares"]["control"].items())
    print(f"  control {c['accounted_control_ratio']:.3f}: {parts}")
    print(f"plain writes      {w['plain_MB_s']:>10,.0f} MB/s")
    lo, hi = w["ratio_range"]
    print(
        f"writer            {w['writer_MB_s']:>10,.0f} MB/s   ratio {w['ratio']:.3f} ({lo:.3f}-{hi:.3f}; goal >= 0.9)"
    )
    print(f"writes, no sums   {s['without_MB_s']:>10,.0f} MB/s")
    print(
        f"writes, checksums {s['with_MB_s']:>10,.0f} MB/s   ratio {s['ratio']:.3f} (goal >= 0.95; "
        f"xxh3 {s['hash_GB_s']:.1f} GB/s = {s['hash_share_of_write']:.1%} of the write time)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"collect": c, "writer": w, "checksums": s}, indent=1))


if __name__ == "__main__":
    main()
