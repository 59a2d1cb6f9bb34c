"""Shared pieces of the GPU check (bench/gpu.py): sizes, tolerances, the run context and the report."""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from activault.config import Config, parse_config

BF16_TOL = 0.05
"""Relative error (Frobenius, per stored segment) allowed between bf16 activations and a reference.

bf16 keeps 8 significant bits (unit roundoff 2**-8 = 0.4%), so the stored values alone carry up to
0.2%; each of 16 blocks adds rounded GEMM outputs and residual sums, which compound to about 1% at
the last block (1.1-1.2% measured on the CPU for a 16-block random Llama, bf16 vs fp32). 0.05 leaves
a factor 4 over that, while a packing or position bug changes activations by tens of percent: the
leak control in the same run reports how much (about 140% on the CPU).
"""
FP32_TOL = 1e-4
"""The same in fp32: only summation order differs (packed kernels, batch shapes)."""
RUN = "check"  # every collection of the check uses this run name, each in its own store


@dataclass(frozen=True)
class Sizes:
    """Model and workload of one mode of the check."""

    device: str
    dtype: str  # of the collection and the stored activations
    layers: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    check: tuple[int, int, int]  # correctness collection: seq_length, batch_size, n_batches
    speed: tuple[int, int, int]  # speed collection: seq_length, batch_size, n_batches
    tol: float
    max_segments: int = 256  # documents recomputed one at a time
    leak_segments: int = 32  # of them, also run with the row's earlier context (the leak control)
    busy_ms: float = 0.0  # GPU work queued between reads, so copies wait behind it

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


GPU = Sizes("cuda", "bfloat16", 16, 2048, 5632, 16, 8, (512, 8, 4), (2048, 16, 16), BF16_TOL, busy_ms=150)
CPU = Sizes("cpu", "float32", 4, 64, 128, 4, 2, (64, 4, 4), (128, 8, 6), FP32_TOL, max_segments=64)


def hook_names(layers: int) -> list[str]:
    """Every hook kind: residual in and out, attention output, MLP input, and a raw module input."""
    return [
        "models.layers.0.pre",
        f"models.layers.{layers // 3}.self_attn.post",
        f"models.layers.{2 * layers // 3}.mlp.pre",
        f"model.layers.{layers - 2}.mlp.down_proj.pre",
        f"models.layers.{layers - 1}.post",
    ]


def module_path(hook: str) -> tuple[str, str]:
    """(module path in a Llama, "pre" or "post"), written out here rather than asking activault."""
    parts = hook.split(".")
    if parts[0] == "models":  # models.layers.{i}[.self_attn|.mlp].{pre|post}
        parts[0] = "model"
    return ".".join(parts[:-1]), parts[-1]


def tiny() -> Any:
    """activault's tiny-model helpers (activault.tools.tiny; activault.tiny before the restructure)."""
    return internal("activault.tools.tiny", "activault.tiny")


def internal(new: str, old: str) -> Any:
    """An internal activault module (for the forward-alone baseline), under its new or old name."""
    try:
        return importlib.import_module(new)
    except ModuleNotFoundError:
        return importlib.import_module(old)


def collect(cfg: Config) -> Any:
    """activault's public `collect(cfg)`, without a progress bar."""
    from activault import collect as run

    return run(cfg, show_progress=False)


def mount_of(path: Path) -> dict[str, str]:
    """The filesystem holding `path` (from /proc/mounts): a tmpfs would measure memory, not a disk."""
    best = {"mount": "?", "fs": "?", "device": "?"}
    try:
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best["mount"].strip("?")
            ):
                best = {"mount": mnt, "fs": fs, "device": dev}
    except OSError:
        pass
    return best


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the report ----------------------------------------------------------------------------------


@dataclass
class Entry:
    section: str  # "correctness" or "speed"
    name: str
    status: str  # passed, failed, measured, skipped, error
    summary: str
    gpu_only: bool = False
    device: str = "cpu"
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)


class Report:
    """Entries written to OUTDIR/gpu_check.json after each one, and summary.md at the end."""

    def __init__(self, out: Path, info: dict[str, Any]):
        self.out, self.info = out, info
        self.entries: list[Entry] = []
        self.t0 = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)

    def run(
        self,
        section: str,
        name: str,
        fn: Callable[[], tuple[str, str, dict]],
        *,
        device: str,
        gpu_only: bool = False,
        skip: str | None = None,
    ) -> Entry:
        """Run one check; `fn` returns (status, one-line summary, values). An exception is an error."""
        t = time.monotonic()
        if skip is not None:
            entry = Entry(section, name, "skipped", skip, gpu_only, device)
        else:
            log(f"{section}: {name} ...")
            try:
                status, summary, values = fn()
                entry = Entry(section, name, status, summary, gpu_only, device, values=values)
            except Exception as e:  # noqa: BLE001 - recorded, and the other checks still run
                entry = Entry(
                    section,
                    name,
                    "error",
                    f"{type(e).__name__}: {e}",
                    gpu_only,
                    device,
                    values={"traceback": traceback.format_exc()},
                )
            gc.collect()  # models hold reference cycles: free their GPU memory before the next entry
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        entry.seconds = round(time.monotonic() - t, 2)
        log(f"{section}: {name}: {entry.status}: {entry.summary}")
        self.entries.append(entry)
        self.write_json()
        return entry

    @property
    def ok(self) -> bool:
        return not any(e.section == "correctness" and e.status in ("failed", "error") for e in self.entries)

    def write_json(self) -> None:
        doc = {
            "check": "activault gpu check",
            "version": 1,
            **self.info,
            "ok": self.ok,
            "seconds": round(time.monotonic() - self.t0, 1),
            "entries": [asdict(e) for e in self.entries],
        }
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def write_summary(self) -> None:
        info, lines = self.info, []
        dev = info["device"]
        lines += [
            f"# activault GPU check, {info['date']}",
            "",
            f"- device: {dev['name']} ({dev['mode']}, {dev['gpus']} GPU(s)); {dev['cpus']} CPUs",
            f"- torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
            f"Python {info['versions']['python']}",
            f"- model: {info['model']}",
            f"- total {time.monotonic() - self.t0:.0f} s; correctness {'passed' if self.ok else 'FAILED'}",
            "",
        ]
        for section, title in (("correctness", "1. Correctness"), ("speed", "2. Speed (ratios in this run)")):
            lines += [f"## {title}", "", "| check | status | result |", "| --- | --- | --- |"]
            for e in self.entries:
                if e.section == section and e.status != "skipped":
                    lines.append(f"| {e.name} | {e.status} | {e.summary.replace('|', '/')} |")
            lines.append("")
        skipped = [e for e in self.entries if e.status == "skipped"]
        if skipped:
            lines += ["## Skipped", ""] + [f"- {e.section} / {e.name}: {e.summary}" for e in skipped] + [""]
        (self.out / "summary.md").write_text("\n".join(lines))


def environment(sz: Sizes, forced_cpu: bool) -> dict[str, Any]:
    import transformers

    cuda = sz.device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    for mod in ("datasets", "pyarrow", "numpy", "safetensors", "pydantic", "obstore", "flash_attn"):
        try:
            versions[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: reported as such
            versions[mod] = None
    mode = "cuda" if cuda else ("cpu (--cpu)" if forced_cpu else "cpu (no CUDA)")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sizes": asdict(sz),
        "versions": versions,
        "device": {
            "mode": mode,
            "name": name,
            "gpus": torch.cuda.device_count() if cuda else 0,
            "cpus": os.cpu_count(),
        },
        "model": f"random Llama, {sz.layers} layers, d_model {sz.d}, ffn {sz.ffn}, {sz.dtype}, sdpa",
    }


# -- the run context ------------------------------------------------------------------------------


@dataclass
class Context:
    sz: Sizes
    work: Path
    model_dir: Path
    corpus: Path
    hooks: list[str]
    deadline: float
    runs: dict[str, Path] = field(default_factory=dict)  # name -> run folder
    measured: dict[str, float] = field(default_factory=dict)  # figures one entry hands to another

    @property
    def cuda(self) -> bool:
        return self.sz.device == "cuda"

    def config(
        self,
        run: str,
        *,
        shape: tuple[int, int, int],
        storage: Path,
        hooks: list[str] | None = None,
        batches_per_upload: int = 1,
        attn: str = "sdpa",
        device: str | None = None,
        **data: Any,
    ) -> Config:
        seq, batch, n = shape
        return parse_config(
            {
                "run_name": run,
                "storage": str(storage),
                "transformer_config": {
                    "model_name": str(self.model_dir),
                    "dtype": self.sz.dtype,
                    "device": device or self.sz.device,
                    "attn_implementation": attn,
                },
                "data_config": {
                    "data_key": str(self.corpus),
                    "n_batches": n,
                    "seq_length": seq,
                    "batch_size": batch,
                    "seed": 0,
                    **data,
                },
                "upload_config": {"batches_per_upload": batches_per_upload, "hooks": hooks or self.hooks},
            },
            "(gpu check)",
        )
