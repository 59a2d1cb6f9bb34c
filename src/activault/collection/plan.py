"""What a collection will store and cost, known from the config and the model's shape alone."""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from activault import dtypes
from activault.config import Config
from activault.errors import ActivaultError, ConfigError
from activault.storage import Store
from activault.units import human_bytes

GB = 1e9
# Stored ÷ raw bytes of states before a run's first file is measured: bench/compression.py on real
# activations (all-MiniLM-L6-v2, layer 3 residual and MLP output, Debian licence texts).
# Smaller models and sparser hooks compress more; random weights compress very differently.
ASSUMED_RATIO = {"bfloat16": 0.69, "float16": 0.84, "float32": 0.84}
# fp8 stores 1 byte per value plus a float32 scale per token; zstd then keeps this much of it.
ASSUMED_FP8_ZSTD = 0.90


@dataclass
class Plan:
    """What a collection will produce, known before any weights load."""

    tokens: int
    files: int
    rows_per_file: int
    bytes_per_hook: dict[str, int]
    price_per_gb_month: float
    buffer_bytes: int
    raw_bytes_per_hook: dict[str, int] = field(default_factory=dict)  # as if uncompressed
    compression: str = "none"
    dtype: str = ""  # of states
    # planned: n_batches (the data may run out first); at most: n_batches all, bounded by the data's
    # size; unknown: n_batches all over data of unknown size (then tokens, files and bytes are 0).
    size: Literal["planned", "at most", "unknown"] = "planned"
    basis: str = ""  # for all: how the data's size is known, or why it is not

    def amount(self, text: str) -> str:
        """A planned quantity as the plan knows it: `text`, `at most text` or `unknown`."""
        return {"planned": text, "at most": f"at most {text}", "unknown": "unknown"}[self.size]

    @property
    def total_bytes(self) -> int:
        """Bytes stored (with compression: assumed until measured)."""
        return sum(self.bytes_per_hook.values())

    @property
    def raw_bytes(self) -> int:
        return sum(self.raw_bytes_per_hook.values()) or self.total_bytes

    def compression_line(self) -> str | None:
        """How the compressed size was estimated, labelled as assumed; None without compression."""
        if self.compression == "none":
            return None
        ratio = self.total_bytes / max(self.raw_bytes, 1)
        return (
            f"compression  {self.compression}: assumed {ratio:.2f} of raw bytes for {self.dtype} "
            f"(measured on real activations; the run logs its own ratio after the first file); "
            f"raw {human_bytes(self.raw_bytes)}"
        )

    @property
    def monthly_cost(self) -> float:
        return self.total_bytes / GB * self.price_per_gb_month


# Bytes per value of the dtypes weights and states may have (names, so planning needs no torch).
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


TOKEN_BYTES = 16  # beside each token's states: int32 id, int32 position, int64 document (format 4)


def _name(dtype: Any) -> str:
    """A dtype's canonical name, from the name itself or a torch dtype."""
    return dtype if isinstance(dtype, str) else dtypes.name(dtype)


def states_ratio(compression: str, dtype: Any, d: int) -> float:
    """Assumed stored ÷ raw bytes of `states` [.., d] of `dtype` (a torch dtype or its name) under a codec."""
    if compression == "zstd":
        return ASSUMED_RATIO.get(_name(dtype), 1.0)
    if compression == "fp8":
        return (1 + 4 / max(d, 1)) / ITEMSIZE[_name(dtype)] * ASSUMED_FP8_ZSTD
    return 1.0


def make_plan(cfg: Config, dims: dict[str, int], itemsize: int, machine: int | None = None, dtype: Any = None) -> Plan:
    """Tokens, files and bytes for one machine (or the whole run when machine is None).

    Args:
        dtype: of states, a torch dtype or its name (default: float32 or bfloat16 by itemsize).
    """
    d = cfg.data_config
    size: Literal["planned", "at most", "unknown"] = "planned"
    basis = ""
    if d.n_batches == "all":
        tokens, files, size, basis = _until_exhausted(cfg, machine)
    else:
        batches = d.n_batches if machine is None else cfg.machine_batches(machine)
        machines = range(cfg.num_runs) if machine is None else [machine]
        files = sum(cfg.machine_files(m) or 0 for m in machines)
        tokens = (batches or 0) * d.batch_size * d.seq_length
    codec = cfg.upload_config.compression
    dtype = _name(dtype) if dtype is not None else ("float32" if itemsize == 4 else "bfloat16")
    raw = {h: tokens * (dim * itemsize + TOKEN_BYTES) for h, dim in dims.items()}
    stored = {
        h: round(tokens * (dim * itemsize * states_ratio(codec, dtype, dim) + TOKEN_BYTES)) for h, dim in dims.items()
    }
    return Plan(
        tokens,
        files,
        cfg.rows_per_file,
        stored,
        cfg.upload_config.price_per_gb_month,
        buffer_bytes(cfg, dims, itemsize),
        raw,
        codec,
        dtype,
        size,
        basis,
    )


def _until_exhausted(cfg: Config, machine: int | None) -> tuple[int, int, Literal["at most", "unknown"], str]:
    """(stored tokens, files, size, basis) of `n_batches: all`, bounded by the data's size.

    A machine's share is bounded by the whole data (how documents split is known only by reading
    them); rows are whole, so each machine's last row adds padding, and its last file is partial.
    """
    from activault.collection.datasize import data_size
    from activault.collection.sources import source_for

    d = cfg.data_config
    try:
        size = data_size(source_for(d))
    except ActivaultError as e:  # the preflight names it with its fix
        return 0, 0, "unknown", f"data_key does not resolve ({str(e).split('; ')[0]})"
    if size.tokens is None:
        return 0, 0, "unknown", size.basis
    machines = cfg.num_runs if machine is None else 1
    rows = -(-size.tokens // d.seq_length) + machines - 1
    files = -(-rows // cfg.rows_per_file) + machines - 1
    return rows * d.seq_length, files, "at most", size.basis


class MeasuredRatio:
    """Logs the run's stored bytes and cost projected from each hook's first compressed file.

    Called from writer threads with (hook, raw bytes, stored bytes) of a file.
    """

    def __init__(self, plan: Plan, log: logging.Logger):
        self.plan, self.log = plan, log
        self.ratios: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, hook: str, raw: int, stored: int) -> None:
        with self._lock:
            if hook in self.ratios:
                return
            self.ratios[hook] = stored / max(raw, 1)
            if len(self.ratios) < len(self.plan.raw_bytes_per_hook):
                return
        if self.plan.size == "unknown":  # nothing to project onto
            each = ", ".join(f"{h} {r:.3f}" for h, r in self.ratios.items())
            self.log.info("compression  measured on the first file: %s of raw bytes", each)
            return
        total = sum(b * self.ratios[h] for h, b in self.plan.raw_bytes_per_hook.items())
        each = ", ".join(f"{h} {self.ratios[h]:.3f}" for h in self.plan.raw_bytes_per_hook)
        self.log.info(
            "compression  measured on the first file: %s of raw bytes; this machine will store %s (~$%.2f/month)",
            each,
            self.plan.amount(f"~{human_bytes(total)}"),
            total / GB * self.plan.price_per_gb_month,
        )


def buffer_bytes(cfg: Config, dims: dict[str, int], itemsize: int) -> int:
    """Host memory for megabatch buffers: max_pending + 1 per hook, each a whole file of states."""
    rows, seq = cfg.rows_per_file, cfg.data_config.seq_length
    return (cfg.upload_config.max_pending + 1) * sum(rows * seq * d * itemsize for d in dims.values())


def check_feasible(
    cfg: Config,
    dims: dict[str, int],
    itemsize: int,
    model_config: Any,
    memory: int | None,
    pinned_limit: int | None = None,
) -> None:
    """Refuse sizes this machine or model cannot run, before any weights load (the first problem)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    problems = feasibility_problems(cfg, dims, itemsize, limit, memory, pinned_limit)
    if problems:
        raise ConfigError(problems[0])


def feasibility_problems(
    cfg: Config,
    dims: dict[str, int],
    itemsize: int,
    max_positions: Any,
    memory: int | None,
    pinned_limit: int | None = None,
) -> list[str]:
    """Every size this machine or model cannot run, each with its fix.

    Args:
        max_positions: the model's max_position_embeddings; anything but an int is not checked.
        pinned_limit: on CUDA the buffers are pinned (never swapped): at most this many bytes.
    """
    problems = []
    limit = max_positions
    if isinstance(limit, int) and not isinstance(limit, bool) and cfg.data_config.seq_length > limit:
        problems.append(
            f"data_config.seq_length={cfg.data_config.seq_length} exceeds the model's max_position_embeddings "
            f"({limit}); use seq_length <= {limit}"
        )
    need = buffer_bytes(cfg, dims, itemsize)
    if memory is not None and need > 0.8 * memory:
        problems.append(
            f"megabatch buffers need {human_bytes(need)} of host memory ((max_pending + 1) x {len(dims)} hooks x "
            f"{cfg.rows_per_file} rows x {cfg.data_config.seq_length} tokens), but {human_bytes(memory)} is "
            "available: lower upload_config.batches_per_upload, data_config.batch_size or upload_config.max_pending"
        )
    if pinned_limit is not None and need > pinned_limit:
        problems.append(
            f"megabatch buffers need {human_bytes(need)} of pinned host memory (page-locked for GPU copies), "
            f"more than half of this machine's RAM ({human_bytes(2 * pinned_limit)}) would starve the "
            "system: lower upload_config.batches_per_upload, data_config.batch_size or upload_config.max_pending"
        )
    return problems


def pinned_limit(cuda: bool | None = None) -> int | None:
    """Page-locked bytes a collection may hold: half the machine's RAM (Linux), None without CUDA.

    Args:
        cuda: whether the model runs on CUDA; None asks torch.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return None
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    return total // 2


def available_memory() -> int | None:
    """Physical memory available now (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def summary_lines(
    cfg: Config, plan: Plan, dims: dict[str, int], info: dict[str, Any], dest: str, machine: int
) -> list[str]:
    """The job summary a collection logs before weights load."""
    lines = [
        f"model        {cfg.transformer_config.model_name} ({info.get('model_type', '?')}, "
        f"{info.get('n_layers', '?')} layers, d_model {info.get('d_model', '?')})",
        f"machine      {machine} of {cfg.num_runs}",
        tokens_line(plan, f"{plan.rows_per_file} rows x {cfg.data_config.seq_length}"),
    ]
    for h, b in plan.bytes_per_hook.items():
        lines.append(f"hook         {h}  d={dims[h]}  {plan.amount(human_bytes(b))}")
    lines += [note] if (note := plan.compression_line()) else []
    lines += [
        f"total        {plan.amount(human_bytes(plan.total_bytes))}  ({plan.amount(f'~${plan.monthly_cost:,.2f}')}"
        f"/month at ${plan.price_per_gb_month}/GB-month)",
        f"buffers      {human_bytes(plan.buffer_bytes)} of host memory for megabatches in flight",
        f"destination  {dest}/{cfg.run_name}",
    ]
    return lines


def tokens_line(plan: Plan, rows: str) -> str:
    """The tokens a plan stores, in files of `rows`, and for `n_batches: all` how that is known."""
    if plan.size == "planned":
        return f"tokens       {plan.tokens:,} in {plan.files} files of {rows}"
    until = f"  (n_batches: all, until the data runs out: {plan.basis})"
    if plan.size == "unknown":
        return f"tokens       unknown, in files of {rows}{until}"
    return f"tokens       at most {plan.tokens:,} in at most {plan.files} files of {rows}{until}"


# AWS charges for data leaving a region (internet egress, first tier, USD per GB).
AWS_EGRESS_PER_GB = 0.09


def _host(endpoint: str) -> str:
    """The host of an endpoint URL (a scheme optional); "" for one that names none or does not parse."""
    try:
        return urlparse(endpoint if "://" in endpoint else f"http://{endpoint}").hostname or ""
    except ValueError:  # e.g. "http://[bad": an unclosed IPv6 bracket
        return ""


def is_local_endpoint(endpoint: str) -> bool:
    """Whether an endpoint is this machine or a private network (no transfer costs, no egress)."""
    host = _host(endpoint)
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


def cost_notes(store: Store, nbytes: int | None) -> list[str]:
    """Warnings for the job summary: data leaves this machine (and, read back from AWS, the region).

    Args:
        nbytes: what is uploaded; None: unknown (`n_batches: all` over data of unknown size).
    """
    endpoint: str | None = getattr(store, "endpoint", None)  # only object stores have one
    if endpoint is None or is_local_endpoint(endpoint):
        return []
    gb = (nbytes or 0) / 1e9
    amount = "an unknown amount (n_batches: all)" if nbytes is None else f"{gb:,.1f} GB"
    host = _host(endpoint) or endpoint
    if not endpoint or host.endswith(".amazonaws.com"):
        region = getattr(store, "region", "us-east-1")
        per_read = "" if nbytes is None else f": ~${gb * AWS_EGRESS_PER_GB:,.2f} per full read"
        return [
            f"uploading {amount} to AWS S3 ({region}) over the network; uploads are free, but "
            f"reading it back outside {region} costs egress (~${AWS_EGRESS_PER_GB}/GB{per_read}); "
            "train in the same region to avoid it"
        ]
    return [
        f"uploading {amount} to the remote endpoint {host}; check its transfer, request and "
        "egress prices, and its bandwidth from here"
    ]
