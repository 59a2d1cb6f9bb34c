"""The child side of bench/read.py: one reader, one run, in its own process (peak RSS is its own).

    python -m bench.readers CASE_JSON   # prints one JSON line: bytes, seconds, first item, RSS...

Baselines (their buffers are set up and touched before the clock starts):
- raw: each file's bytes, `buffer_size` files ahead, in the readers' ranges (`fetch.range_step`) on
  RANGE_WORKERS threads, read into reused buffers (pread locally, ranged GETs on S3). raw-map: each
  file mapped (`Store.map`) and populated front to back by its file's thread, no copy. raw-one,
  raw-one-map: one file alone the same ways, into a warm buffer or a mapped file (the first-batch
  reference: not a first-touched fresh buffer, which flattered the readers 3-5x).
- raw-gather, raw-map-gather: raw / raw-map held a window at a time, each window's tokens permuted
  and gathered into a reused batch on TokenLoader's gather threads: the floor of a shuffling loader.
- decode-gather: decode-limit into a window of reused tensors, each window's tokens permuted and
  gathered as raw-gather's: the floor of a shuffling reader of compressed files (the gather needs
  the same cores as the decode).
- decode-limit: the zstd run's `states` frames, read into memory before the clock, decoded with
  the codec's public `unpack` on its process-wide pool (a thread per core, started and warmed by
  one untimed decode) into one reused, touched output tensor: the most any reader of compressed
  files can deliver on this machine (no I/O, no checksums).
Readers: rcache, tokens (`-read`: map_reads=False; `-fresh`: recycle=False; `-zstd`: the zstd
run; `-1get`: one GET per file), original (bench/original.py on S3; a whole-file torch.load locally).
`-again`: the same reader after one whole untimed pass in the same process, the page cache then set
as the case says: its buffers touched before the clock, as the baselines' are. On a VM that hands
freed memory back to its host (free page reporting, as this project's), a fresh buffer costs ~2 ms
per MiB to touch, more than reading the bytes into it: a short run in a fresh process measures the
touch, a long run reuses its buffers (docs/benchmarks.md, "First touch").
"""

from __future__ import annotations

import io
import json
import resource
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PREPARED = ("raw", "decode-limit", "decode-gather")  # set up outside the clock; readers' construction is timed


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in bytes.

    Not getrusage's ru_maxrss: Linux carries it across exec, so a child reports its parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def evict(root: Path) -> None:
    """Out of the page cache, every file under `root` (written back first: dirty pages stay)."""
    from support.pagecache import evict as evict_file

    for p in files_under(root):
        evict_file(p)


def warm(root: Path) -> None:
    """Read every file once: the page cache holds them (this VM's DAMON pages out idle memory)."""
    buf = bytearray(16 << 20)
    for p in files_under(root):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident(root: Path) -> float:
    """The share of the files' pages in the page cache (mincore on a mapping: reads nothing)."""
    import mmap

    from support.pagecache import cached_pages

    paths = files_under(root)
    pages = sum(-(-p.stat().st_size // mmap.PAGESIZE) for p in paths)
    return sum(cached_pages(p) for p in paths) / max(pages, 1)


def megabatch_keys(store: Any, folder: str, files: int | None = None) -> list[tuple[str, int]]:
    from activault.vault import megabatch as fmt

    return [(e.key, e.size) for e in store.list_dir(folder)[1] if fmt.is_megabatch(e.key)][:files]


def raw(
    store: Any, folder: str, files: int | None, buffer_size: int, range_size: int | None, size: int, held: int = 1
) -> Iterator[memoryview]:
    """Each file's bytes into reused buffers (`held`: files the consumer keeps at once); the first
    next() sets them up (touched) and yields an empty view."""
    import numpy as np

    from activault.reading.fetch import RANGE_WORKERS, range_step

    bufs = [np.ones(size, np.uint8) for _ in range(buffer_size + held)]
    yield memoryview(b"")
    keys = megabatch_keys(store, folder, files)

    def fetch(key: str, n: int, k: int) -> memoryview:
        step = range_step(n, range_size)
        view = bufs[k % len(bufs)].data.cast("B")[:n]
        list(ranges.map(lambda s: store.read_into(key, s, view[s : s + step]), range(0, n, step)))
        return view

    with ThreadPoolExecutor(RANGE_WORKERS) as ranges:
        yield from ahead(keys, buffer_size, fetch)


def raw_map(
    store: Any, folder: str, files: int | None, buffer_size: int, range_size: int | None
) -> Iterator[memoryview]:
    """Each file mapped (`Store.map`) and populated front to back by its thread, as the readers do locally."""
    from activault.reading.fetch import range_step
    from activault.storage.base import populate

    yield memoryview(b"")
    keys = megabatch_keys(store, folder, files)

    def fetch(key: str, n: int, k: int) -> memoryview:
        mapping = store.map(key)
        step = range_step(n, range_size)
        for s in range(0, n, step):
            populate(mapping, s, min(s + step, n))
        return memoryview(mapping)[:n]  # unmapped once the consumer drops it

    yield from ahead(keys, buffer_size, fetch)


def ahead(keys: list[tuple[str, int]], buffer_size: int, fetch: Any) -> Iterator[memoryview]:
    """fetch(key, size, index) of each file in turn, `buffer_size` files ahead on as many threads."""
    with ThreadPoolExecutor(buffer_size) as pool:
        pending = deque(pool.submit(fetch, k, n, i) for i, (k, n) in enumerate(keys[:buffer_size]))
        for i in range(len(keys)):
            view = pending.popleft().result()
            if i + buffer_size < len(keys):
                k, n = keys[i + buffer_size]
                pending.append(pool.submit(fetch, k, n, i + buffer_size))
            yield view


def states_rows(files: Iterator[memoryview]) -> Iterator[Any]:
    """Each raw file's `states` as rows of bytes `[tokens, d x itemsize]` (views, no copy)."""
    import numpy as np

    from activault.vault import megabatch as fmt

    for view in files:
        header = fmt.parse_header(view, "raw")
        a, b = header.byte_range("states")
        yield np.frombuffer(view[a:b], np.uint8).reshape(-1, header.d_model * header.dtype.itemsize)


def raw_gather(files: Iterator[Any], window: int, batch_tokens: int) -> Iterator[memoryview]:
    """`files` (`[tokens, row_bytes]` uint8 each) a window at a time, their tokens permuted and
    gathered into a reused batch (np.take per file and batch, split over TokenLoader's threads)."""
    import numpy as np

    from activault.reading.window import GATHER_THREADS, take_rows
    from activault.reading.workers import Workers

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
        for rows in files:
            held.append(rows)
            if len(held) == window:
                yield from gather(held)
                held = []
        if held:
            yield from gather(held)
    finally:
        if workers is not None:
            workers.close()


def decode_limit(store: Any, folder: str, held: int = 1) -> Iterator[Any]:
    """The stored `states` of each file decoded on every core into reused tensors (`held` of them,
    in turn: the files a consumer holds at once), no I/O."""
    import torch

    from activault.vault import codec as codecs
    from activault.vault import megabatch as fmt

    blobs = []
    for key, _ in megabatch_keys(store, folder):
        buf = store.get(key)
        header = fmt.parse_header(buf, key)
        a, b = header.byte_range("states")
        blobs.append((key, memoryview(buf)[a:b], header.packed["states"]))
    if not blobs:
        raise RuntimeError(f"no compressed files under {folder}")
    outs = [torch.ones(blobs[0][2].shape, dtype=blobs[0][2].dtype) for _ in range(held)]  # touched: warm
    # One untimed decode first, on the process-wide codec pool the readers use: its threads started
    # and their scratch buffers touched, as a long decode finds them (a pool per call, as before,
    # started threads and faulted fresh scratch in for every file: 233k faults per GB).
    key, blob, packed = blobs[0]
    codecs.unpack(blob, packed, key, empty=lambda *_, **__: outs[0])
    yield memoryview(b"")
    for i, (key, blob, packed) in enumerate(blobs):
        out = outs[i % held]
        yield codecs.unpack(blob, packed, key, empty=lambda *_, o=out, **__: o)


def reader(case: dict[str, Any]) -> Iterable[Any]:
    """The case's items; a PREPARED baseline has yielded its untimed set-up already."""
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
    run = "zrun" if "-zstd" in name else "run"
    read = ReadOptions(
        buffer_size=buffer_size, store_options=options, range_size=range_size, recycle=not name.endswith("-fresh")
    )
    uri = f"{case['root'].rstrip('/')}/{run}/hook"
    if name == "decode-limit":
        it: Iterator[Any] = decode_limit(store, "zrun/hook")
    elif name == "decode-gather":  # the floor of a shuffling reader of compressed files
        it = decode_limit(store, "zrun/hook", held=case["window"])
        next(it)  # the untimed set-up
        rows = (s.reshape(-1, s.shape[-1]).view(torch.uint8).numpy() for s in it)
        return raw_gather(rows, case["window"], case["batch_tokens"])
    elif name.startswith("raw"):
        files = 1 if name.startswith("raw-one") else None
        if "-map" in name:
            it = raw_map(store, "run/hook", files, buffer_size, range_size)
        else:
            held = case["window"] if name.endswith("-gather") else 1
            it = raw(store, "run/hook", files, buffer_size, range_size, case["file_bytes"] + (1 << 20), held)
    elif name.startswith("rcache"):
        return RCache(uri, options=read)
    elif name.startswith("tokens"):
        return TokenLoader(uri, batch_tokens=case["batch_tokens"], window=case["window"], options=read)
    elif name == "original" and case["env"]:
        from bench.original import original_reader

        meta = json.loads(store.get_text("run/hook/metadata.json"))
        legacy = [(f"legacy/hook/{e.key.rsplit('/', 1)[-1]}", e.size) for e in store.list_dir("legacy/hook")[1]]
        return original_reader(case["env"], "bench", legacy, meta["shape"], torch.bfloat16, buffer_size)
    else:
        keys = [e.key for e in store.list_dir("legacy/hook")[1]]
        return (torch.load(io.BytesIO(bytes(store.get(k))), weights_only=True)["states"] for k in keys)
    next(it)  # the untimed set-up
    return raw_gather(states_rows(it), case["window"], case["batch_tokens"]) if name.endswith("-gather") else it


def nbytes(item: Any) -> int:
    """Bytes delivered: a tensor's decoded bytes, a raw read's stored bytes."""
    if isinstance(item, memoryview):
        return item.nbytes
    return int(item.numel() * item.element_size())


def touch_ms_per_mib(mib: int = 64) -> float:
    """Milliseconds per MiB to fault in a fresh buffer here (first touch: a page fault per page)."""
    import numpy as np

    t0 = time.perf_counter()
    mem = np.empty(mib << 20, np.uint8)
    mem[::4096] = 1
    return (time.perf_counter() - t0) * 1e3 / mib


def child(case: dict[str, Any]) -> dict[str, Any]:
    import gc

    import activault.reading.rcache  # noqa: F401 - imports are not timed
    import activault.reading.tokens  # noqa: F401

    if case["reader"].endswith("-again"):  # one untimed pass first: its buffers are then warm
        for item in reader({**case, "reader": case["reader"].removesuffix("-again")}):
            del item
        gc.collect()
        case = {**case, "reader": case["reader"].removesuffix("-again")}
    residency = None
    if case["store"] == "local":
        root = Path(case["root"])
        (evict if case["cold"] else warm)(root)
        residency = resident(root)  # checked, not assumed: cold must read ~0, warm ~1
    base = rss()
    cpu0 = time.process_time()
    faults0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    items = reader(case)  # readers: construction (listing, metadata) is timed
    if case["reader"].startswith(PREPARED):
        t0 = time.perf_counter()
    stamps, sizes = [], []
    for item in items:
        stamps.append(time.perf_counter() - t0)
        sizes.append(nbytes(item))
        del item
    seconds = stamps[-1]
    cpu = time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF)
    total = sum(sizes)
    return {
        "bytes": total,
        "seconds": seconds,
        "gb_s": total / seconds / 1e9,
        # After the first item: the rate a long run settles at, without the start.
        "steady_gb_s": (total - sizes[0]) / (seconds - stamps[0]) / 1e9 if len(stamps) > 1 else None,
        "first_s": stamps[0],
        "cpu_s_per_gb": cpu / (total / 1e9),
        "minor_faults": faults.ru_minflt - faults0.ru_minflt,
        "major_faults": faults.ru_majflt - faults0.ru_majflt,
        "resident_before": residency,
        "base_rss": base,
        "peak_rss": rss("VmHWM"),
        "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # the original's worker
    }


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
