"""Section 2 of the GPU check: speed of the CUDA path as ratios to its own limits, in the same run.

- collection tok/s ÷ the same hooked forward alone (goal >= 0.95), with and without writes;
- the collector's device-to-host copies (seen by the CUDA profiler) ÷ a plain pinned
  `copy_(non_blocking=True)` of the same bytes (goal >= 0.9), and whether they overlap the forward;
- RCache into CUDA ÷ a host read of the same files plus one host-to-device copy each (goal >= 0.9);
- the local disk's write speed (fsync + rename per file, as the store writes).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from activault import RCache
from bench.gpu_common import RUN, Context, Report, collect, internal, mount_of


def speed(report: Report, ctx: Context) -> None:
    dev, last = ctx.sz.device, ctx.hooks[-1]
    no_cuda = None if ctx.cuda else "needs CUDA"
    run = ctx.work / "speed" / RUN
    entries: list[tuple[str, Callable[[], tuple[str, str, dict]], bool, str | None]] = [
        ("disk_write", partial(disk_write, ctx), False, None),
        ("collection_vs_forward", partial(collection_vs_forward, ctx, [last], False), False, None),
        ("rcache_vs_read_plus_copy", partial(rcache_vs_raw, ctx, run / last), False, None),
        ("d2h_copies_vs_plain_copy", partial(d2h_vs_plain_copy, ctx, last), True, no_cuda),
        ("collection_without_writes_vs_forward", partial(collection_vs_forward, ctx, [last], True), False, None),
    ]
    for name, fn, gpu_only, skip in entries:
        if skip is None and time.monotonic() > ctx.deadline:
            skip = "time budget spent (--budget)"
        report.run("speed", name, fn, device="cuda" if gpu_only else dev, gpu_only=gpu_only, skip=skip)
    for folder in ("speed", "speed-no-writes"):
        shutil.rmtree(ctx.work / folder, ignore_errors=True)


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def _itemsize(ctx: Context) -> int:
    return ctx.sz.torch_dtype.itemsize


def _file_bytes(ctx: Context) -> tuple[int, int]:
    """(files, bytes of states per file) of the speed collection: 2 batches per file, one hook."""
    seq, batch, n = ctx.sz.speed
    return -(-n // 2), 2 * batch * seq * ctx.sz.d * _itemsize(ctx)


def disk_write(ctx: Context) -> tuple[str, str, dict]:
    """Plain sequential writes of the speed run's file sizes, each fsynced and renamed into place."""
    files, size = _file_bytes(ctx)
    blob = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().data
    root = ctx.work / "disk"
    root.mkdir()
    t0 = time.perf_counter()
    for k in range(files):
        tmp = root / f".{k}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / f"{k}.bin")
    rate = files * size / (time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    ctx.measured["disk_bytes_s"] = rate
    where = mount_of(ctx.work)
    return (
        "measured",
        (
            f"{rate / 1e9:.2f} GB/s ({files} files of {size / 2**20:.1f} MiB, fsync + rename, "
            f"{where['fs']} at {where['mount']})"
        ),
        {"bytes_s": rate, "files": files, "file_bytes": size, "folder": str(ctx.work), **where},
    )


def forward_alone(ctx: Context, cfg: Any, batches: list) -> float:
    """Tokens/s of the collector's own hooked, truncated forward over pre-built packed batches."""
    model_mod = internal("activault.collection.model", "activault.model")
    hooks_mod = internal("activault.collection.hooks", "activault.hooks")
    tc = cfg.transformer_config
    specs = hooks_mod.resolve_hooks(model_mod.load_skeleton(tc), cfg.upload_config.hooks)
    model = model_mod.load_model(tc, specs)
    with hooks_mod.Capture(model, specs) as cap:
        cap(batches[0].input_ids, batches[0].position_ids, batches[0].segment_ids)  # warm-up
        _sync(ctx)
        t0 = time.perf_counter()
        for b in batches:
            cap(b.input_ids, b.position_ids, b.segment_ids)
        _sync(ctx)
        dt = time.perf_counter() - t0
    del model, cap
    if ctx.cuda:
        torch.cuda.empty_cache()
    return sum(int(b.keep.sum()) for b in batches) / dt


def collection_vs_forward(ctx: Context, hooks: list[str], skip_cache: bool) -> tuple[str, str, dict]:
    """Best of two interleaved runs each, so drift on the machine hits both sides."""
    seq, batch, n = ctx.sz.speed
    store = ctx.work / ("speed" if not skip_cache else "speed-no-writes")
    cfg = ctx.config(RUN, shape=ctx.sz.speed, storage=store, hooks=hooks, batches_per_upload=2, skip_cache=skip_cache)
    packing = internal("activault.collection.packing", "activault.pack")
    model_mod = internal("activault.collection.model", "activault.model")
    batches = list(
        itertools.islice(packing.iter_batches(cfg.data_config, model_mod.load_tokenizer(cfg.transformer_config)), n)
    )
    alone, full, produced = [], [], []
    for _ in range(2):
        alone.append(forward_alone(ctx, cfg, batches))
        shutil.rmtree(store, ignore_errors=True)  # the last run's files stay (the read test uses them)
        r = collect(cfg)
        full.append(r.tokens / r.seconds)
        produced.append(r.tokens * ctx.sz.d * _itemsize(ctx) / r.seconds)
        if ctx.cuda:
            torch.cuda.empty_cache()
    a, b = max(alone), max(full)
    act = max(produced)
    values = {
        "forward_tok_s": alone,
        "collect_tok_s": full,
        "ratio": b / a,
        "goal": 0.95,
        "activation_bytes_s": act,
        "tokens": sum(int(x.keep.sum()) for x in batches),
        "batch": [batch, seq],
        "batches": n,
        "hooks": hooks,
        "writes": not skip_cache,
    }
    disk = ctx.measured.get("disk_bytes_s")
    note = ""
    if not skip_cache and disk is not None:
        values["disk_bytes_s"] = disk
        note = f"; disk {disk / 1e9:.2f} GB/s"
    return (
        "measured",
        (f"{b:,.0f} / {a:,.0f} tok/s = {b / a:.3f} (goal >= 0.95); activations {act / 1e9:.2f} GB/s{note}"),
        values,
    )


def cuda_trace(ctx: Context, fn: Callable[[], Any], name: str) -> list[dict[str, Any]]:
    """The CUDA profiler's events (kernels, memcpys) while `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = ctx.work / f"{name}.trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    path.unlink()
    return [e for e in events if isinstance(e, dict) and "dur" in e and "ts" in e]


def dtoh_copies(events: list[dict[str, Any]], min_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if "memcpy" in str(e.get("cat", "")).lower()
        and "DtoH" in str(e.get("name", ""))
        and int((e.get("args") or {}).get("bytes", 0)) >= min_bytes
    ]


def gb_per_s(copies: list[dict[str, Any]]) -> float:
    return sum(int(e["args"]["bytes"]) for e in copies) / max(sum(float(e["dur"]) for e in copies), 1e-9) / 1e3


def merged_intervals(events: list[dict[str, Any]]) -> list[list[float]]:
    """The time intervals [start, end] (microseconds) covered by some event, merged."""
    merged: list[list[float]] = []
    for a, b in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def busy_fraction(events: list[dict[str, Any]], start: float, end: float) -> float:
    """Fraction of [start, end] during which the GPU ran a kernel or a copy: the rest it waited on the host."""
    hit = sum(max(0.0, min(end, b) - max(start, a)) for a, b in merged_intervals(events))
    return hit / (end - start) if end > start else 0.0


def overlap_fraction(copies: list[dict[str, Any]], kernels: list[dict[str, Any]]) -> float:
    """Fraction of the copies' time during which some kernel ran on the GPU."""
    merged = merged_intervals(kernels)
    total = sum(float(c["dur"]) for c in copies)
    hit = 0.0
    for c in copies:
        a, b = float(c["ts"]), float(c["ts"]) + float(c["dur"])
        hit += sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged if x < b and y > a)
    return hit / total if total else 0.0


def d2h_vs_plain_copy(ctx: Context, hook: str) -> tuple[str, str, dict]:
    """The collector's device-to-host copies, as the CUDA profiler saw them in a real collection
    (without writes), against plain pinned non-blocking copies of the same size."""
    seq, batch, _ = ctx.sz.speed
    cfg = ctx.config(
        RUN, shape=(seq, batch, 4), storage=ctx.work / "d2h", hooks=[hook], batches_per_upload=2, skip_cache=True
    )
    events = cuda_trace(ctx, lambda: collect(cfg), "collect")
    shutil.rmtree(ctx.work / "d2h", ignore_errors=True)
    copies = dtoh_copies(events)
    kernels = [e for e in events if str(e.get("cat", "")).lower() == "kernel"]
    size = batch * seq * ctx.sz.d * _itemsize(ctx)
    src = torch.randn(batch, seq, ctx.sz.d, device="cuda").to(ctx.sz.torch_dtype)
    dst = torch.empty((2 * batch, seq, ctx.sz.d), dtype=ctx.sz.torch_dtype, pin_memory=True)

    def plain() -> None:
        for i in range(8):
            dst[(i % 2) * batch : (i % 2 + 1) * batch].copy_(src, non_blocking=True)

    ref = dtoh_copies(cuda_trace(ctx, plain, "plain"))
    names = sorted({str(e.get("name")) for e in copies})
    values: dict[str, Any] = {
        "copies": len(copies),
        "copy_names": names,
        "bytes_per_copy": size,
        "reference_copies": len(ref),
        "goal": 0.9,
    }
    if not copies or not ref:
        return "error", f"the profiler saw {len(copies)} collector and {len(ref)} reference copies of >= 1 MiB", values
    col_gb, ref_gb = gb_per_s(copies), gb_per_s(ref)
    streams = sorted({(e.get("args") or {}).get("stream") for e in copies}, key=str)
    kernel_streams = sorted({(e.get("args") or {}).get("stream") for e in kernels}, key=str)
    busy = sum(float(e["dur"]) for e in kernels) + sum(float(e["dur"]) for e in copies)
    # From the first batch's copy to the last one's: forward passes of the later batches, and the
    # host work between them (inputs, masks, statistics) during which the GPU may wait.
    first, last = min(float(e["ts"]) for e in copies), max(float(e["ts"]) + float(e["dur"]) for e in copies)
    gpu = [e for e in events if str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")]
    values.update(
        {
            "collector_gb_s": col_gb,
            "plain_gb_s": ref_gb,
            "ratio": col_gb / ref_gb,
            "gpu_busy_between_batches": busy_fraction(gpu, first, last),
            "overlap_with_kernels": overlap_fraction(copies, kernels),
            "copy_streams": streams,
            "kernel_streams": kernel_streams,
            "copy_share_of_gpu_time": sum(float(e["dur"]) for e in copies) / max(busy, 1e-9),
            "pageable_destination": any("Pageable" in n for n in names),
        }
    )
    waits = "the forward waits for them (same stream)" if set(streams) & set(kernel_streams) else "separate stream"
    return (
        "measured",
        (
            f"{col_gb:.1f} / {ref_gb:.1f} GB/s = {col_gb / ref_gb:.2f} (goal >= 0.9); {len(copies)} copies, "
            f"{values['overlap_with_kernels']:.0%} overlapped with kernels, "
            f"{values['copy_share_of_gpu_time']:.1%} of GPU time; {waits}; GPU busy "
            f"{values['gpu_busy_between_batches']:.0%} between batches; destinations {names}"
        ),
        values,
    )


def rcache_vs_raw(ctx: Context, folder: Path) -> tuple[str, str, dict]:
    """RCache (into CUDA where there is one) vs reading each file into one buffer and copying it over."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "error", f"no files under {folder} (the collection entry did not run)", {}
    total = sum(f.stat().st_size for f in files)
    dev = ctx.sz.device
    buf = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8, pin_memory=ctx.cuda)
    view = buf.numpy().data
    dst = torch.empty_like(buf, device=dev) if ctx.cuda else None

    def raw() -> float:
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                n = fh.readinto(view)
            if dst is not None:
                dst[:n].copy_(buf[:n])  # one host-to-device copy, waited for before the buffer is reused
        _sync(ctx)
        return total / (time.perf_counter() - t0)

    def rcache() -> float:
        t0 = time.perf_counter()
        with RCache(folder, device=dev, return_ids=True) as cache:
            for _ in cache:
                pass
        _sync(ctx)
        return total / (time.perf_counter() - t0)

    raw(), rcache()  # warm: page cache, pinned host blocks
    a, b = [], []
    for _ in range(2):
        a.append(raw())
        b.append(rcache())
    limit = "host read + H2D copy" if ctx.cuda else "host read"
    ra, rb = max(a), max(b)
    return (
        "measured",
        f"{rb / 1e9:.2f} / {ra / 1e9:.2f} GB/s = {rb / ra:.2f} vs {limit} (goal >= 0.9)",
        {
            "rcache_bytes_s": b,
            "raw_bytes_s": a,
            "ratio": rb / ra,
            "goal": 0.9,
            "files": len(files),
            "bytes": total,
            "limit": limit,
        },
    )
