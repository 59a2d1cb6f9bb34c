"""collection/plan.py: tokens, files and bytes of a config equal an independent count of what a
collection writes; sizes a machine or model cannot run are refused before weights load; cost notes."""

from __future__ import annotations

import logging
import math
import threading
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from activault.collection import plan
from activault.collection.plan import (
    ASSUMED_FP8_ZSTD,
    ASSUMED_RATIO,
    MeasuredRatio,
    buffer_bytes,
    check_feasible,
    cost_notes,
    feasibility_problems,
    is_local_endpoint,
    make_plan,
    states_ratio,
    summary_lines,
)
from activault.config import parse_config
from activault.errors import ConfigError
from activault.units import human_bytes

DIMS = {"models.layers.1.post": 64, "models.layers.0.mlp.pre": 256}


def config(n_batches=10, num_runs=1, batch_size=3, seq_length=16, per_upload=4, **upload: Any):
    return parse_config(
        {
            "run_name": "r",
            "num_runs": num_runs,
            "transformer_config": {"model_name": "m"},
            "data_config": {
                "data_key": "x",
                "n_batches": n_batches,
                "seq_length": seq_length,
                "batch_size": batch_size,
            },
            "upload_config": {"batches_per_upload": per_upload, "hooks": list(DIMS), **upload},
        }
    )


def written_files(cfg) -> list[dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The tensors of every file a collection writes per hook: batches dealt to machines one by one,
    then cut into files of batches_per_upload (the last one partial)."""
    d = cfg.data_config
    dealt = [0] * cfg.num_runs
    for b in range(d.n_batches):
        dealt[b % cfg.num_runs] += 1
    files = []
    for batches in dealt:
        while batches > 0:
            rows = min(batches, cfg.upload_config.batches_per_upload) * d.batch_size
            files.append(
                {
                    "input_ids": ((rows, d.seq_length), torch.int32),
                    "positions": ((rows, d.seq_length), torch.int32),
                    "documents": ((rows, d.seq_length), torch.int64),
                }
            )
            batches -= cfg.upload_config.batches_per_upload
    return files


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.empty(shape, dtype=dtype).nbytes


@pytest.mark.parametrize(
    "n_batches,num_runs,per_upload", [(10, 1, 4), (10, 3, 4), (12, 4, 3), (7, 7, 2), (1, 1, 1), (101, 5, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_files_tokens_and_bytes_equal_what_a_collection_writes(n_batches, num_runs, per_upload, dtype):
    cfg = config(n_batches, num_runs, per_upload=per_upload)
    files = written_files(cfg)
    p = make_plan(cfg, DIMS, dtype.itemsize, dtype=dtype)
    assert p.files == len(files)
    assert p.tokens == sum(math.prod(f["input_ids"][0]) for f in files)
    for hook, d in DIMS.items():
        raw = sum(
            nbytes((*f["input_ids"][0], d), dtype)
            + nbytes(*f["input_ids"])
            + nbytes(*f["positions"])
            + nbytes(*f["documents"])
            for f in files
        )
        assert p.raw_bytes_per_hook[hook] == raw == p.bytes_per_hook[hook], "no codec: stored is raw"
    assert p.total_bytes == p.raw_bytes == sum(p.bytes_per_hook.values())
    assert p.rows_per_file == cfg.data_config.batch_size * per_upload and p.dtype == str(dtype)[6:]
    for m in range(num_runs):  # one machine's plan: its own share
        mine = make_plan(cfg, DIMS, dtype.itemsize, machine=m, dtype=dtype)
        assert mine.tokens == cfg.machine_batches(m) * cfg.data_config.batch_size * cfg.data_config.seq_length
        assert mine.files == cfg.machine_files(m)
    assert sum(make_plan(cfg, DIMS, 4, machine=m).files for m in range(num_runs)) == p.files


def test_cost_is_stored_bytes_times_the_price():
    p = make_plan(config(price_per_gb_month=0.5), DIMS, 4)
    assert p.monthly_cost == pytest.approx(p.total_bytes / 1e9 * 0.5)
    assert p.price_per_gb_month == 0.5


def test_compressed_sizes_are_the_assumed_ratios_and_say_so():
    cfg = config(compression="zstd")
    raw = make_plan(config(), DIMS, 2, dtype=torch.bfloat16)
    z = make_plan(cfg, DIMS, 2, dtype=torch.bfloat16)
    tokens = raw.tokens
    for hook, d in DIMS.items():
        assert z.raw_bytes_per_hook[hook] == raw.bytes_per_hook[hook]
        assert z.bytes_per_hook[hook] == round(tokens * (d * 2 * ASSUMED_RATIO["bfloat16"] + 16))
    line = z.compression_line()
    assert line is not None and "zstd: assumed" in line and "bfloat16" in line and "measured" in line
    assert raw.compression_line() is None
    fp8 = make_plan(config(compression="fp8"), DIMS, 2, dtype=torch.bfloat16)
    for hook, d in DIMS.items():
        # fp8: one byte per value and a float32 scale per token, then zstd keeps ASSUMED_FP8_ZSTD of it.
        states = tokens * (d + 4) * ASSUMED_FP8_ZSTD
        assert fp8.bytes_per_hook[hook] == pytest.approx(states + tokens * 16, abs=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_states_ratio(dtype):
    assert states_ratio("none", dtype, 64) == 1.0
    assert states_ratio("zstd", dtype, 64) == ASSUMED_RATIO[str(dtype)[6:]]
    assert states_ratio("fp8", dtype, 64) == pytest.approx((64 + 4) / (64 * dtype.itemsize) * ASSUMED_FP8_ZSTD)
    assert states_ratio("zstd", torch.float64, 8) == 1.0, "no assumption for a dtype never measured"
    assert states_ratio("fp8", dtype, 0) > 0, "a zero width divides nothing by zero"


def test_buffers_hold_max_pending_plus_one_whole_files_per_hook():
    cfg = config(max_pending=3)
    rows, seq = cfg.rows_per_file, cfg.data_config.seq_length
    one_file = {h: nbytes((rows, seq, d), torch.float32) for h, d in DIMS.items()}
    assert buffer_bytes(cfg, DIMS, 4) == 4 * sum(one_file.values())
    assert make_plan(cfg, DIMS, 4).buffer_bytes == buffer_bytes(cfg, DIMS, 4)


# ---- feasibility: refused before weights load ----


def test_rows_longer_than_the_model_reads_are_refused_naming_both():
    model = SimpleNamespace(max_position_embeddings=16)
    check_feasible(config(seq_length=16), DIMS, 4, model, memory=None)
    with pytest.raises(ConfigError) as e:
        check_feasible(config(seq_length=17), DIMS, 4, model, memory=None)
    assert "data_config.seq_length=17 exceeds the model's max_position_embeddings (16)" in str(e.value)
    assert "use seq_length <= 16" in str(e.value)
    for unknown in (None, "2048", 16.0):  # a config that does not say: not checked
        check_feasible(config(seq_length=17), DIMS, 4, SimpleNamespace(max_position_embeddings=unknown), None)


def test_buffers_beyond_four_fifths_of_memory_are_refused_naming_what_to_lower():
    cfg = config()
    need = buffer_bytes(cfg, DIMS, 4)
    check_feasible(cfg, DIMS, 4, None, memory=math.ceil(need / 0.8))
    with pytest.raises(ConfigError) as e:
        check_feasible(cfg, DIMS, 4, None, memory=int(need / 0.8) - 1)
    msg = str(e.value)
    assert "of host memory" in msg and "upload_config.batches_per_upload" in msg and "upload_config.max_pending" in msg
    check_feasible(cfg, DIMS, 4, None, memory=None, pinned_limit=need)
    with pytest.raises(ConfigError, match="pinned host memory"):
        check_feasible(cfg, DIMS, 4, None, memory=None, pinned_limit=need - 1)


def test_every_infeasible_size_is_listed_at_once():
    cfg = config(seq_length=17)
    need = buffer_bytes(cfg, DIMS, 4)
    problems = feasibility_problems(cfg, DIMS, 4, 16, memory=need, pinned_limit=need - 1)
    assert len(problems) == 3
    assert "exceeds the model's max_position_embeddings (16)" in problems[0]
    assert "of host memory" in problems[1] and "pinned host memory" in problems[2]
    assert feasibility_problems(cfg, DIMS, 4, True, None) == []  # a bool is no position count


def test_pinned_limit_without_torch_is_half_the_ram_on_cuda():
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert plan.pinned_limit(cuda=True) == total // 2 and plan.pinned_limit(cuda=False) is None


def test_plans_take_dtype_names():
    assert make_plan(config(), DIMS, 2, dtype="bfloat16") == make_plan(config(), DIMS, 2, dtype=torch.bfloat16)
    assert states_ratio("fp8", "float16", 64) == states_ratio("fp8", torch.float16, 64)


def test_memory_limits_read_this_machine():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    available = plan.available_memory()
    assert available is not None and 0 < available <= info["MemTotal"]
    limit = plan.pinned_limit()
    assert limit == (info["MemTotal"] // 2 if torch.cuda.is_available() else None)


# ---- the measured ratio ----


def test_the_measured_ratio_is_logged_once_when_every_hook_has_its_first_file(caplog):
    p = make_plan(config(compression="zstd"), DIMS, 2, dtype=torch.bfloat16)
    measured = MeasuredRatio(p, logging.getLogger("activault.test.plan"))
    hooks = list(DIMS)
    with caplog.at_level(logging.INFO, logger="activault.test.plan"):
        measured(hooks[0], 1000, 500)
        measured(hooks[0], 1000, 900)  # the first file counts, later ones do not
        assert caplog.records == []
        threads = [threading.Thread(target=measured, args=(hooks[1], 1000, 250)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(caplog.records) == 1
    assert measured.ratios == {hooks[0]: 0.5, hooks[1]: 0.25}
    total = p.raw_bytes_per_hook[hooks[0]] * 0.5 + p.raw_bytes_per_hook[hooks[1]] * 0.25
    assert f"~{human_bytes(total)}" in caplog.text and f"{hooks[0]} 0.500, {hooks[1]} 0.250" in caplog.text


# ---- summaries ----


def test_summary_lines_show_the_plan():
    cfg = config(n_batches=8, num_runs=2)
    p = make_plan(cfg, DIMS, 4, machine=1)
    info = {"model_type": "llama", "n_layers": 4, "d_model": 64}
    lines = summary_lines(cfg, p, DIMS, info, "/vault", 1)
    text = "\n".join(lines)
    assert "machine      1 of 2" in text and f"tokens       {p.tokens:,} in {p.files} files" in text
    assert "(llama, 4 layers, d_model 64)" in text and "destination  /vault/r" in text
    assert sum(line.startswith("hook ") for line in lines) == len(DIMS)


# ---- where the bytes go ----


@pytest.mark.parametrize(
    "endpoint,local",
    [
        ("http://127.0.0.1:9000", True),
        ("localhost:9000", True),
        ("http://localhost", True),
        ("http://minio.local:9000", True),
        ("https://s3.cluster.internal", True),
        ("10.1.2.3:9000", True),
        ("http://192.168.0.4", True),
        ("http://[::1]:9000", True),
        ("http://169.254.169.254", True),
        ("https://s3.us-west-2.amazonaws.com", False),
        ("https://minio.example.com", False),
        ("http://8.8.8.8", False),
        ("", False),
        ("garbage", False),
        ("http://", False),
        ("x" * 5000, False),
        ("http://[bad", False),  # was: a raw ValueError (Invalid IPv6 URL)
        ("[::1", False),
        ("http://[not-an-ip]:9000", False),
    ],
)
def test_is_local_endpoint(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_cost_notes_warn_only_when_bytes_leave_the_machine():
    assert cost_notes(SimpleNamespace(), 10**12) == [], "a local store has no endpoint"
    assert cost_notes(SimpleNamespace(endpoint="http://127.0.0.1:9000"), 10**12) == []
    (aws,) = cost_notes(SimpleNamespace(endpoint="https://s3.eu-west-1.amazonaws.com", region="eu-west-1"), 2e12)
    assert "2,000.0 GB to AWS S3 (eu-west-1)" in aws and "~$180.00 per full read" in aws
    (default,) = cost_notes(SimpleNamespace(endpoint=""), 1e9)  # no endpoint given: AWS
    assert "AWS S3 (us-east-1)" in default
    (remote,) = cost_notes(SimpleNamespace(endpoint="https://minio.example.com:9000"), 5e9)
    assert "5.0 GB to the remote endpoint minio.example.com" in remote
    (bare,) = cost_notes(SimpleNamespace(endpoint="minio.example.com:9000"), 5e9)
    assert "to the remote endpoint minio.example.com;" in bare
    (bad,) = cost_notes(SimpleNamespace(endpoint="http://[bad"), 5e9)  # the endpoint named as it is
    assert "5.0 GB to the remote endpoint http://[bad;" in bad


def test_an_unknown_amount_is_said_not_planned_as_zero(tmp_path):
    """n_batches all over data of unknown size: the summary and cost notes say unknown (was: 0 GB)."""
    (aws,) = cost_notes(SimpleNamespace(endpoint="https://s3.eu-west-1.amazonaws.com", region="eu-west-1"), None)
    assert "uploading an unknown amount (n_batches: all) to AWS S3" in aws and "per full read" not in aws
    cfg = config()
    cfg.data_config.data_key = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": ["a b"]}), tmp_path / "d.parquet")
    cfg.data_config.n_batches = "all"
    p = make_plan(cfg, DIMS, 4)
    assert (p.size, p.tokens, p.files) == ("unknown", 0, 0) and "compressed" in p.basis
    text = "\n".join(summary_lines(cfg, p, DIMS, {}, "/vault", 0))
    assert "tokens       unknown, in files of 12 rows x 16  (n_batches: all, until the data runs out:" in text
    assert "total        unknown  (unknown/month" in text
