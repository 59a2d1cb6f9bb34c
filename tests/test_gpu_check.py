"""The GPU check (scripts/gpu_check.sh) runs on the CPU too, GPU parts reported as skipped, so the
script a GPU machine runs once cannot rot unseen between those runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_common import hook_names, module_path
from bench.gpu_correctness import segments
from bench.gpu_speed import busy_fraction, dtoh_copies, gb_per_s, overlap_fraction

ROOT = Path(__file__).resolve().parent.parent
CORRECTNESS = {
    "bytes_identical_across_runs",
    "packed_equals_alone",
    "hooks_equal_independent_fp32",
    "statistics_equal_float64",
    "reader_cpu_equals_files",
    "tokenloader_cpu_equals_files",
}
GPU_ONLY = {
    "reader_cuda_equals_files",
    "tokenloader_cuda_equals_cpu",
    "flash_attention_2_equals_sdpa",
    "device_map_equals_one_gpu",
    "d2h_copies_vs_plain_copy",
}
SPEED = {"disk_write", "collection_vs_forward", "collection_without_writes_vs_forward", "rcache_vs_read_plus_copy"}


@pytest.mark.slow
def test_check_runs_on_the_cpu_and_says_what_it_skipped(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    # No wheel folder: every module the check needs is already here, so nothing may be installed.
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TMP": str(work), "WHEELS": str(tmp_path / "none")}
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["ok"] and doc["device"]["mode"] == "cpu (--cpu)" and doc["sizes"]["device"] == "cpu"
    entries = {e["name"]: e for e in doc["entries"]}
    assert set(entries) == CORRECTNESS | GPU_ONLY | SPEED
    for name in CORRECTNESS:
        e = entries[name]
        assert e["status"] == "passed" and not e["gpu_only"], e
    for name in GPU_ONLY:
        assert entries[name]["status"] == "skipped" and entries[name]["gpu_only"], entries[name]
        assert entries[name]["summary"] == "needs CUDA"
    for name in SPEED:
        assert entries[name]["status"] == "measured", entries[name]
    assert entries["collection_vs_forward"]["values"]["ratio"] > 0
    # The comparisons can tell a leak between packed documents from rounding.
    fp32 = entries["hooks_equal_independent_fp32"]["values"]
    assert fp32["max"] <= fp32["tolerance"] < fp32["leak_min"] and fp32["segments"] >= 10
    summary = (out / "summary.md").read_text()
    assert "## Skipped" in summary and all(f"{n}: needs CUDA" in summary for n in GPU_ONLY)
    assert list(work.iterdir()) == []  # the model and the stores are removed


def test_trace_helpers_read_profiler_events():
    kernel = {"cat": "kernel", "name": "gemm", "ts": 0.0, "dur": 100.0, "args": {"stream": 7}}
    copy = {
        "cat": "gpu_memcpy",
        "name": "Memcpy DtoH (Device -> Pinned)",
        "ts": 50.0,
        "dur": 100.0,
        "args": {"stream": 7, "bytes": 4 << 20},
    }
    small = {**copy, "args": {"stream": 7, "bytes": 16}}
    h2d = {**copy, "name": "Memcpy HtoD (Pinned -> Device)"}
    copies = dtoh_copies([kernel, copy, small, h2d])
    assert copies == [copy]
    assert gb_per_s(copies) == pytest.approx((4 << 20) / 100e-6 / 1e9)  # bytes per microsecond -> GB/s
    assert overlap_fraction(copies, [kernel]) == pytest.approx(0.5)
    assert overlap_fraction(copies, []) == 0.0
    assert busy_fraction([kernel, copy], 0.0, 300.0) == pytest.approx(0.5)  # busy 0-150 of 0-300


def test_segments_and_hook_paths():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6], [3, 4, 0, 1, 2, -1, -1]])
    assert segments(pos) == [(0, 0, 3), (0, 3, 5), (0, 5, 7), (1, 0, 2), (1, 2, 5)]
    assert [module_path(h) for h in hook_names(4)] == [
        ("model.layers.0", "pre"),
        ("model.layers.1.self_attn", "post"),
        ("model.layers.2.mlp", "pre"),
        ("model.layers.2.mlp.down_proj", "pre"),
        ("model.layers.3", "post"),
    ]
