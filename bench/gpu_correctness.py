"""Section 1 of the GPU check: what collection stored, and what the readers deliver, equals an
independent computation (each document alone, fp32, float64 statistics, safetensors' own reader)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from activault import RCache, TokenLoader
from bench.gpu_common import RUN, Context, Report, collect, module_path

# -- reading what was stored -----------------------------------------------------------------------


def read_hook(folder: Path) -> dict[str, torch.Tensor]:
    """A hook's megabatch files, concatenated in file order, read with safetensors itself."""
    from safetensors import safe_open

    parts: dict[str, list[torch.Tensor]] = {"states": [], "input_ids": [], "positions": []}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for k in parts:
                parts[k].append(st.get_tensor(k))
    return {k: torch.cat(v) for k, v in parts.items()}


def segments(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each stored piece of a document: a run of consecutive positions."""
    out = []
    for r, row in enumerate(positions.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1] + 1:
                if row[start] >= 0:  # -1 is padding
                    out.append((r, start, t))
                start = t
    return out


def tree_digest(run: Path) -> dict[str, str]:
    """sha256 of every file of a run; cfg.json without `storage`, the one thing that differs."""
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "cfg.json" and p.parent == run:
                rec = json.loads(data)
                rec["config"].pop("storage", None)
                data = json.dumps(rec, sort_keys=True).encode()
            out[str(p.relative_to(run))] = hashlib.sha256(data).hexdigest()
    return out


# -- references: each document alone, with plain torch hooks ---------------------------------------


class Taps:
    """Inputs/outputs of the hooked modules during one forward, with plain torch hooks."""

    def __init__(self, model: torch.nn.Module, hooks: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = []
        for h in hooks:
            path, kind = module_path(h)
            if kind == "pre":
                self.handles.append(modules[path].register_forward_pre_hook(partial(self._pre, h), with_kwargs=True))
            else:
                self.handles.append(modules[path].register_forward_hook(partial(self._post, h)))

    def _pre(self, name: str, module: Any, args: tuple, kwargs: dict) -> None:
        self.out[name] = args[0] if args else kwargs["hidden_states"]

    def _post(self, name: str, module: Any, args: tuple, output: Any) -> None:
        self.out[name] = output if isinstance(output, torch.Tensor) else output[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def load_reference(ctx: Context, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=dtype, attn_implementation=attn)
    return model.to(ctx.sz.device).eval()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def compare_alone(
    ctx: Context,
    stored: dict[str, dict[str, torch.Tensor]],
    model: torch.nn.Module,
    segs: list[tuple[int, int, int]],
    leak: bool = False,
) -> dict[str, Any]:
    """Max and median relative error of the stored rows against each segment run alone by `model`;
    with `leak`, also how far the last hook moves when the row's earlier context is not masked."""
    dev, first, last = ctx.sz.device, ctx.hooks[0], ctx.hooks[-1]
    errs: dict[str, list[float]] = {h: [] for h in ctx.hooks}
    leaks: list[float] = []
    taps = Taps(model, ctx.hooks)
    try:
        with torch.inference_mode():
            for r, s, e in segs:
                ids = stored[first]["input_ids"][r, s:e].to(dev, torch.int64)
                model(input_ids=ids[None], use_cache=False)
                alone = {h: t[0] for h, t in taps.out.items()}
                for h in ctx.hooks:
                    errs[h].append(rel_err(stored[h]["states"][r, s:e].to(dev), alone[h]))
                if leak and s > 0 and len(leaks) < ctx.sz.leak_segments:
                    row = stored[first]["input_ids"][r, :e].to(dev, torch.int64)
                    model(input_ids=row[None], use_cache=False)  # the row's context, unmasked
                    leaks.append(rel_err(taps.out[last][0, s:e], alone[last]))
    finally:
        taps.close()
    out: dict[str, Any] = {
        "segments": len(segs),
        "tokens": sum(e - s for _, s, e in segs),
        "hooks": {h: {"max": max(v), "median": sorted(v)[len(v) // 2]} for h, v in errs.items()},
    }
    out["max"] = max(v["max"] for v in out["hooks"].values())
    if leak:
        out["leak_min"] = min(leaks) if leaks else None
        out["leak_segments"] = len(leaks)
    return out


# -- section 1: correctness ----------------------------------------------------------------------


def correctness(report: Report, ctx: Context) -> None:
    sz, dev = ctx.sz, ctx.sz.device
    for name in ("a", "b"):  # two runs, same config and seed, in two stores
        collect(ctx.config(RUN, shape=sz.check, storage=ctx.work / name))
        ctx.runs[name] = ctx.work / name / RUN
    report.run("correctness", "bytes_identical_across_runs", partial(check_identical, ctx), device=dev)
    stored = {h: read_hook(ctx.runs["a"] / h) for h in ctx.hooks}
    segs = segments(stored[ctx.hooks[0]]["positions"])[: sz.max_segments]
    report.run("correctness", "packed_equals_alone", partial(check_packed, ctx, stored, segs), device=dev)
    report.run("correctness", "hooks_equal_independent_fp32", partial(check_fp32, ctx, stored, segs), device=dev)
    report.run("correctness", "statistics_equal_float64", partial(check_stats, ctx), device=dev)
    report.run("correctness", "reader_cpu_equals_files", partial(check_reader, ctx, stored, "cpu"), device="cpu")
    report.run("correctness", "tokenloader_cpu_equals_files", partial(check_loader_files, ctx, stored), device="cpu")
    no_cuda = None if ctx.cuda else "needs CUDA"
    report.run(
        "correctness",
        "reader_cuda_equals_files",
        partial(check_reader, ctx, stored, "cuda"),
        device="cuda",
        gpu_only=True,
        skip=no_cuda,
    )
    report.run(
        "correctness",
        "tokenloader_cuda_equals_cpu",
        partial(check_loader_cuda, ctx),
        device="cuda",
        gpu_only=True,
        skip=no_cuda,
    )
    flash = no_cuda or (None if importlib.util.find_spec("flash_attn") else "flash_attn is not installed")
    report.run(
        "correctness",
        "flash_attention_2_equals_sdpa",
        partial(check_flash, ctx, stored, segs),
        device="cuda",
        gpu_only=True,
        skip=flash,
    )
    multi = no_cuda or (None if torch.cuda.device_count() > 1 else "needs 2 or more GPUs (device_map)")
    report.run(
        "correctness",
        "device_map_equals_one_gpu",
        partial(check_device_map, ctx, stored, segs),
        device="cuda",
        gpu_only=True,
        skip=multi,
    )


def check_identical(ctx: Context) -> tuple[str, str, dict]:
    """Every file of two runs of the same config and seed, byte for byte."""
    a, b = tree_digest(ctx.runs["a"]), tree_digest(ctx.runs["b"])
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    n = sum(k.endswith(".safetensors") for k in a)
    return (
        ("passed" if not differ else "failed"),
        f"{len(a)} files ({n} megabatches), {len(differ)} differ",
        {"files": len(a), "differ": differ},
    )


def check_packed(ctx: Context, stored: dict, segs: list) -> tuple[str, str, dict]:
    """Stored (packed, collection dtype) vs each document alone through the same model and dtype."""
    model = load_reference(ctx, ctx.sz.torch_dtype, "sdpa")
    v = compare_alone(ctx, stored, model, segs)
    del model
    v["tolerance"] = ctx.sz.tol
    ok = v["max"] <= ctx.sz.tol
    return (
        ("passed" if ok else "failed"),
        (f"max rel err {v['max']:.2e} (tol {ctx.sz.tol:g}) over {v['segments']} documents x {len(ctx.hooks)} hooks"),
        v,
    )


def check_fp32(ctx: Context, stored: dict, segs: list) -> tuple[str, str, dict]:
    """Stored vs an fp32, eager-attention forward of each document alone (plain torch hooks)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    model = load_reference(ctx, torch.float32, "eager")
    v = compare_alone(ctx, stored, model, segs, leak=True)
    del model
    v["tolerance"] = ctx.sz.tol
    leak = v["leak_min"]
    discriminates = leak is None or leak > 2 * ctx.sz.tol
    ok = v["max"] <= ctx.sz.tol and discriminates
    leak_txt = f"; an unmasked row would differ by >= {leak:.2f}" if leak is not None else ""
    return (
        ("passed" if ok else "failed"),
        (f"max rel err {v['max']:.2e} (tol {ctx.sz.tol:g}) over {v['segments']} documents{leak_txt}"),
        v,
    )


def check_stats(ctx: Context) -> tuple[str, str, dict]:
    """statistics.json vs float64 mean, population std and mean norm over every stored real token."""
    worst, out = 0.0, {}
    for h in ctx.hooks:
        mean, std, norm, count = float64_stats(ctx.runs["a"] / h)
        st = json.loads((ctx.runs["a"] / h / "statistics.json").read_text())
        m, s = torch.tensor(st["mean"], dtype=torch.float64), torch.tensor(st["std"], dtype=torch.float64)
        e = {
            "mean": float(((m - mean).abs() / torch.maximum(std, mean.abs()).clamp_min(1e-30)).max()),
            "std": float(((s - std).abs() / std.clamp_min(1e-30)).max()),
            "norm": abs(st["norm"] - norm) / norm,
            "count": st["count"] - count,
        }
        out[h] = e
        worst = max(worst, e["mean"], e["std"], e["norm"], float(abs(e["count"]) > 0))
    return ("passed" if worst <= 1e-6 else "failed"), f"max rel err {worst:.1e} (tol 1e-6), {len(ctx.hooks)} hooks", out


def float64_stats(folder: Path, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(mean, population std, mean L2 norm, count) in float64, two passes over the stored files."""
    t = read_hook(folder)
    x = t["states"].reshape(-1, t["states"].shape[-1])[t["positions"].reshape(-1) >= 0]
    n, total, norms = x.shape[0], torch.zeros(x.shape[1], dtype=torch.float64), 0.0
    for i in range(0, n, chunk):
        c = x[i : i + chunk].double()
        total += c.sum(0)
        norms += float(c.norm(dim=1).sum())
    mean, m2 = total / n, torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, n, chunk):
        m2 += ((x[i : i + chunk].double() - mean) ** 2).sum(0)
    return mean, (m2 / n).sqrt(), norms / n, n


class Busy:
    """Queues about `ms` of GPU work on the current stream without waiting: copies issued after it
    run only once it is done, so a host buffer freed or reused too early shows up as wrong data."""

    def __init__(self, ms: float):
        self.x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.y = torch.empty_like(self.x)
        self.n = 1
        self()  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.n = 4
        self()
        end.record()
        end.synchronize()
        self.n = max(1, math.ceil(ms / (start.elapsed_time(end) / 4)))  # about 1.5 ms per product on an H100

    def __call__(self) -> None:
        for _ in range(self.n):
            torch.matmul(self.x, self.x, out=self.y)


def check_reader(ctx: Context, stored: dict, device: str) -> tuple[str, str, dict]:
    """RCache over every hook (and each buffer size) delivers exactly the stored files; on CUDA with
    the stream kept busy, then shuffled on CUDA equal to shuffled on the CPU."""
    busy = Busy(ctx.sz.busy_ms) if device == "cuda" else None
    checked, bad = 0, []
    for buffer_size in (1, 2):
        items = []
        with RCache(ctx.runs["a"], hooks=ctx.hooks, device=device, return_ids=True, buffer_size=buffer_size) as c:
            for item in c:
                items.append(item)
                if busy is not None:
                    busy()
        if device == "cuda":
            torch.cuda.synchronize()
        bad += _diff_items(items, stored, ctx.hooks, f"buffer_size={buffer_size}")
        checked += len(items)
    if device == "cuda":
        for buffer_size in (1, 2):
            got = _shuffled(ctx, "cuda", buffer_size, busy)
            want = _shuffled(ctx, "cpu", buffer_size, None)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                if not all(torch.equal(g["states"][h].cpu(), w["states"][h]) for h in ctx.hooks):
                    bad.append(f"shuffled, buffer_size={buffer_size}, file {i}: CUDA != CPU")
    status = "passed" if not bad and checked else "failed"
    return status, f"{checked} megabatches x {len(ctx.hooks)} hooks, {len(bad)} differ", {"differ": bad[:20]}


def _shuffled(ctx: Context, device: str, buffer_size: int, busy: Busy | None) -> list:
    out = []
    with RCache(
        ctx.runs["a"], hooks=ctx.hooks, device=device, return_ids=True, shuffle=True, seed=3, buffer_size=buffer_size
    ) as c:
        for item in c:
            out.append(item)
            if busy is not None:
                busy()
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def _diff_items(items: list, stored: dict, hooks: list[str], label: str) -> list[str]:
    bad, row = [], 0
    first = stored[hooks[0]]
    for i, item in enumerate(items):
        n = item["input_ids"].shape[0]
        if not torch.equal(item["input_ids"].cpu(), first["input_ids"][row : row + n].long()):
            bad.append(f"{label}, file {i}: input_ids")
        if not torch.equal(item["positions"].cpu(), first["positions"][row : row + n]):
            bad.append(f"{label}, file {i}: positions")
        for h in hooks:
            if not torch.equal(item["states"][h].cpu(), stored[h]["states"][row : row + n]):
                bad.append(f"{label}, file {i}: states of {h}")
        row += n
    if row != first["input_ids"].shape[0]:
        bad.append(f"{label}: {row} rows read, {first['input_ids'].shape[0]} stored")
    return bad


def _loader_batches(ctx: Context, device: str, busy: Busy | None = None, **opts: Any) -> list:
    seq, batch, _ = ctx.sz.check
    out = []
    with TokenLoader(
        ctx.runs["a"],
        hooks=ctx.hooks,
        batch_tokens=seq * batch // 2,
        window=2,
        seed=0,
        return_ids=True,
        drop_last=False,
        device=device,
        **opts,
    ) as loader:
        for b in loader:
            out.append(b)
            if busy is not None:
                busy()
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def check_loader_files(ctx: Context, stored: dict) -> tuple[str, str, dict]:
    """TokenLoader on the CPU yields every stored real token exactly once (as a multiset)."""
    batches = _loader_batches(ctx, "cpu")
    bad = []
    g = torch.Generator().manual_seed(0)
    for h in ctx.hooks:
        s = stored[h]
        real = s["positions"].reshape(-1) >= 0
        want = s["states"].reshape(-1, s["states"].shape[-1])[real]
        got = torch.cat([b["states"][h] for b in batches])
        r = torch.randn(want.shape[1], dtype=torch.float64, generator=g)
        if got.shape != want.shape or not torch.equal(
            (got.double() @ r).sort().values, (want.double() @ r).sort().values
        ):
            bad.append(h)
    ids = stored[ctx.hooks[0]]["input_ids"].reshape(-1)[stored[ctx.hooks[0]]["positions"].reshape(-1) >= 0]
    if not torch.equal(torch.cat([b["input_ids"] for b in batches]).sort().values, ids.long().sort().values):
        bad.append("input_ids")
    n = sum(b["input_ids"].numel() for b in batches)
    return (
        ("passed" if not bad else "failed"),
        f"{len(batches)} batches, {n} tokens, {len(bad)} hooks differ",
        {"differ": bad},
    )


def check_loader_cuda(ctx: Context) -> tuple[str, str, dict]:
    """TokenLoader with device="cuda" (stream kept busy) equals the same loader on the CPU, raw and normalised."""
    busy, bad, n = Busy(ctx.sz.busy_ms), [], 0
    variants: list[tuple[str, dict[str, Any]]] = [("raw", {}), ("normalised", {"center": True, "norm_target": 1.0})]
    for label, opts in variants:
        got, want = _loader_batches(ctx, "cuda", busy, **opts), _loader_batches(ctx, "cpu", **opts)
        n += len(got)
        if len(got) != len(want):
            bad.append(f"{label}: {len(got)} batches on CUDA, {len(want)} on the CPU")
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            same = all(torch.equal(g["states"][h].cpu(), w["states"][h]) for h in ctx.hooks)
            if not same or not torch.equal(g["input_ids"].cpu(), w["input_ids"]):
                bad.append(f"{label}: batch {i}")
    return ("passed" if not bad else "failed"), f"{n} batches, {len(bad)} differ", {"differ": bad[:20]}


def _compare_stored(ctx: Context, other: Path, stored: dict, segs: list) -> dict[str, Any]:
    worst, per_hook = 0.0, {}
    for h in ctx.hooks:
        o = read_hook(other / h)
        if not torch.equal(o["input_ids"], stored[h]["input_ids"]):
            raise AssertionError(f"{h}: the two runs hold different tokens")
        errs = [rel_err(o["states"][r, s:e], stored[h]["states"][r, s:e]) for r, s, e in segs]
        per_hook[h] = max(errs)
        worst = max(worst, per_hook[h])
    return {"max": worst, "hooks": per_hook, "segments": len(segs), "tolerance": ctx.sz.tol}


def check_flash(ctx: Context, stored: dict, segs: list) -> tuple[str, str, dict]:
    """flash-attention-2 (documents isolated by restarting position ids) stores what sdpa stored."""
    collect(ctx.config(RUN, shape=ctx.sz.check, attn="flash_attention_2", storage=ctx.work / "flash"))
    v = _compare_stored(ctx, ctx.work / "flash" / RUN, stored, segs)
    ok = v["max"] <= ctx.sz.tol
    return ("passed" if ok else "failed"), f"max rel err vs sdpa {v['max']:.2e} (tol {ctx.sz.tol:g})", v


def check_device_map(ctx: Context, stored: dict, segs: list) -> tuple[str, str, dict]:
    """The model split over every GPU stores what one GPU stored, with exact statistics."""
    weights = sum(f.stat().st_size for f in ctx.model_dir.glob("*.safetensors"))
    # 1.3x an even share: room for the largest block, so the weights spread over the GPUs, not the CPU
    cap = f"{int(1.3 * weights / torch.cuda.device_count() / 2**20) + 64}MiB"
    cfg = ctx.config(RUN, shape=ctx.sz.check, device="auto", storage=ctx.work / "split")
    cfg.transformer_config.max_per_device_memory = cap
    collect(cfg)
    run = ctx.work / "split" / RUN
    v = _compare_stored(ctx, run, stored, segs)
    stats = {}
    for h in ctx.hooks:
        mean, std, norm, count = float64_stats(run / h)
        st = json.loads((run / h / "statistics.json").read_text())
        stats[h] = max(
            float(
                (
                    (torch.tensor(st["mean"], dtype=torch.float64) - mean).abs()
                    / torch.maximum(std, mean.abs()).clamp_min(1e-30)
                ).max()
            ),
            abs(st["norm"] - norm) / norm,
            float(st["count"] != count),
        )
    v["statistics"] = stats
    ok = v["max"] <= ctx.sz.tol and max(stats.values()) <= 1e-6
    return (
        ("passed" if ok else "failed"),
        (
            f"{torch.cuda.device_count()} GPUs (cap {cap} each): max rel err {v['max']:.2e}, "
            f"statistics {max(stats.values()):.1e}"
        ),
        v,
    )
