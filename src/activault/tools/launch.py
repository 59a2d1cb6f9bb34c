"""Slurm and Ray launchers: each worker runs `python -m activault collect --config X --machine i`.

The launchers only choose machine indices and where they run; sharding, resume and statistics are
`collect`'s. N (machines in the run) must equal the config's `num_runs`: it is checked before anything
is submitted, so a typo cannot start machines that would collect overlapping data.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from activault.config import Config, load_config, resolve_storage
from activault.errors import ActivaultError, ConfigError
from activault.storage import Store, open_store
from activault.vault.records import read_progress

log = logging.getLogger(__name__)

LOG_TAIL = 4000  # characters of a failed worker's output kept in its result


def check_launch(config: str | Path, n: int, start: int, end: int) -> Config:
    """Load the config and check that machines start..end of n belong to it; return it."""
    cfg = load_config(config)
    if n != cfg.num_runs:
        raise ConfigError(
            f"N={n} machines, but {config} has num_runs={cfg.num_runs}: each machine's share depends on "
            f"num_runs, so set num_runs: {n} in the config (or pass N={cfg.num_runs})"
        )
    if start > end:
        raise ConfigError(f"START={start} is after END={end}; pass 0 <= START <= END < N")
    cfg.check_machine(start, "START")
    cfg.check_machine(end, "END")
    return cfg


def default_slurm_script() -> Path:
    """The batch script shipped with the package, found wherever activault is run from."""
    return Path(str(resources.files("activault").joinpath("tools/collect.slurm")))


def collect_command(config: str | Path, machine: int, storage: str | None = None) -> list[str]:
    """The command every worker runs, the same as on a laptop."""
    cmd = [sys.executable, "-m", "activault", "collect", "--config", str(config), "--machine", str(machine), "--quiet"]
    return cmd + (["--storage", storage] if storage else [])


def run_store(cfg: Config, storage: str | None = None, env: dict[str, str] | None = None) -> Store:
    """The run's store as the workers see it: their environment (`env`) over this process's."""
    merged = {**os.environ, **(env or {})}
    uri = resolve_storage(cfg, storage, merged)
    return open_store(uri, env=merged) if uri.startswith("s3://") else open_store(uri)


def machine_progress(store: Store, cfg: Config, machine: int) -> str:
    """`files k/n` (or `finished`) from machine's progress record; never raises (it only informs)."""
    try:
        rec = read_progress(store, cfg.run_name, machine)
    except ActivaultError as e:  # a damaged record, or the store unreachable for a moment
        return f"progress unreadable ({str(e).split('; ')[0]})"
    if rec is not None and rec.finished:
        return f"finished ({rec.files_done} files)"
    return f"files {rec.files_done if rec else 0}/{cfg.machine_files(machine)}"


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S")


# ---------------------------------------------------------------- Slurm


def submit_slurm(
    config: str | Path,
    n: int,
    start: int,
    end: int,
    *,
    script: str | Path | None = None,
    array: bool = False,
    max_parallel: int | None = None,
    sbatch_args: list[str] | None = None,
    log_dir: str | Path = "logs",
) -> dict[int, str]:
    """Submit machines start..end of n (one job each, or one job array); return {machine: job id}.

    Writes `{log_dir}/slurm_jobs_{time}.txt` mapping machine to job id; job output goes to
    `{log_dir}/activault-{job}.out`.
    """
    check_launch(config, n, start, end)
    script = Path(script) if script is not None else default_slurm_script()
    if not script.is_file():
        raise ConfigError(
            f"Slurm script {script} does not exist; pass --script PATH, or leave it out for the packaged one"
        )
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    config = str(Path(config).absolute())
    base = ["sbatch", "--parsable", *(sbatch_args or [])]
    jobs: dict[int, str] = {}
    if array:
        spec = f"{start}-{end}" + (f"%{max_parallel}" if max_parallel else "")
        out = str(log_dir.absolute() / "activault-%A_%a.out")
        job = _sbatch([*base, f"--array={spec}", f"--output={out}", str(script), config])
        jobs = {m: f"{job}_{m}" for m in range(start, end + 1)}
    else:
        out = str(log_dir.absolute() / "activault-%j.out")
        for m in range(start, end + 1):
            jobs[m] = _sbatch(
                [
                    *base,
                    f"--job-name=activault-m{m}",
                    f"--export=ALL,MACHINE={m}",
                    f"--output={out}",
                    str(script),
                    config,
                ]
            )
            log.info("machine %d: job %s", m, jobs[m])
    mapping = log_dir / f"slurm_jobs_{_stamp()}.txt"
    lines = ["MACHINE | JOB", "---------------", *(f"{m} | {j}" for m, j in jobs.items())]
    mapping.write_text("\n".join(lines) + "\n")
    log.info("submitted machines %d..%d of %d; machine -> job id in %s", start, end, n, mapping)
    return jobs


def _sbatch(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError(
            "sbatch not found: run this on a Slurm login node (or start one: scripts/slurm_local.sh start)"
        ) from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch failed ({shlex.join(cmd)}): {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """JobState of each job (array tasks as `JOB_TASK`), from `scontrol show job`."""
    states: dict[str, str] = {}
    for job in {j.split("_")[0] for j in job_ids}:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            jid = f.get("JobId", "")
            if "ArrayTaskId" in f and f.get("ArrayJobId"):
                jid = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
            states[jid] = f.get("JobState", "UNKNOWN")
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def wait_slurm(jobs: dict[int, str], timeout: float | None = None, poll: float = 2.0) -> dict[int, str]:
    """Block until every job has ended; return {machine: final JobState}."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        states = slurm_states(list(jobs.values()))
        # An array job still pending shows as one record `JOB_[a-b]`: its tasks read UNKNOWN until they start.
        if all(s in FINAL for s in states.values()):
            return {m: states[j] for m, j in jobs.items()}
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Slurm jobs not done after {timeout}s: {states}")
        time.sleep(poll)


# ---------------------------------------------------------------- Ray


@dataclass
class WorkerResult:
    """One machine's outcome on a Ray worker."""

    machine: int
    status: str  # "completed" or "failed"
    returncode: int | None = None
    seconds: float = 0.0
    node: str = ""
    error: str = ""  # the worker's traceback or error message


def _run_worker(cmd: list[str], machine: int) -> dict[str, Any]:
    """Body of a Ray task: run the collect command; never raises, so one failure stops nothing else."""
    import socket

    t0 = time.perf_counter()
    res = WorkerResult(machine, "failed", node=socket.gethostname())
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        res.returncode = out.returncode
        if out.returncode == 0:
            res.status = "completed"
        else:
            res.error = (out.stderr or out.stdout)[-LOG_TAIL:]
    except Exception:
        res.error = traceback.format_exc()[-LOG_TAIL:]
    res.seconds = round(time.perf_counter() - t0, 3)
    return asdict(res)


def ray_options(resources: dict[str, float] | None) -> dict[str, Any]:
    """Ray task options from a resources mapping such as {"CPU": 8, "GPU": 1, "memory": 64e9, "big": 1}."""
    r = dict(resources or {"CPU": 1})
    opts: dict[str, Any] = {"num_cpus": r.pop("CPU", 1), "max_retries": 0}
    if "GPU" in r:
        opts["num_gpus"] = r.pop("GPU")
    if "memory" in r:
        opts["memory"] = r.pop("memory")
    if r:
        opts["resources"] = r
    return opts


def launch_ray(
    config: str | Path,
    n: int,
    start: int,
    end: int,
    *,
    address: str | None = None,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    storage: str | None = None,
    wait: bool = False,
    results_path: str | Path | None = None,
    poll: float = 5.0,
) -> list[dict[str, Any]]:
    """Run machines start..end of n as Ray tasks (each `activault collect --machine i` in a subprocess).

    Without `wait`, returns once submitted (the tasks keep running on the cluster). With `wait`, logs
    each machine's progress until all end, writes the results (JSON) to `results_path` and returns them:
    one dict per machine with its status, and the worker's error output if it failed.
    """
    import ray

    cfg = check_launch(config, n, start, end)
    config = str(Path(config).absolute())  # workers need the same path (a shared filesystem)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    opts = ray_options(resources)
    if env:
        opts["runtime_env"] = {"env_vars": dict(env)}
    task = ray.remote(_run_worker).options(**opts)
    refs = {task.remote(collect_command(config, m, storage), m): m for m in range(start, end + 1)}
    log.info("launched machines %d..%d of %d on Ray (%s per worker)", start, end, n, resources or {"CPU": 1})
    if not wait:
        return [{"machine": m, "status": "submitted", "task": ref.hex()} for ref, m in refs.items()]

    store = run_store(cfg, storage, env)
    results: dict[int, dict[str, Any]] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=poll)
        for ref in done:
            m = refs[ref]
            try:
                results[m] = ray.get(ref)
            except Exception:  # the task itself died (worker lost, node gone)
                results[m] = asdict(WorkerResult(m, "failed", error=traceback.format_exc()[-LOG_TAIL:]))
            r = results[m]
            if r["status"] == "completed":
                log.info("machine %d: completed in %.1fs", m, r["seconds"])
            else:
                log.error("machine %d: FAILED (exit %s)\n%s", m, r["returncode"], r["error"])
        if pending:
            log.info(
                "progress: %s", "; ".join(f"machine {refs[p]} {machine_progress(store, cfg, refs[p])}" for p in pending)
            )
    out = [results[m] for m in sorted(results)]
    failed = [r["machine"] for r in out if r["status"] != "completed"]
    log.info(
        "%d completed, %d failed%s",
        len(out) - len(failed),
        len(failed),
        f" (rerun machines {failed} to finish the run)" if failed else "",
    )
    path = Path(results_path or f"logs/ray_results_{_stamp()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "num_runs": n, "results": out}, indent=1) + "\n")
    log.info("results in %s", path)
    return out


def parse_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        r = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f'--resources is not JSON ({e}); write e.g. \'{{"CPU": 8, "GPU": 1}}\'') from None
    if not isinstance(r, dict) or not all(isinstance(v, int | float) for v in r.values()):
        raise ConfigError('--resources must map resource names to numbers, e.g. {"CPU": 8, "GPU": 1}')
    return r


def parse_env(items: list[str] | None) -> dict[str, str]:
    """`NAME=VALUE`, or `NAME` to pass this process's value on."""
    env: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this environment; pass NAME=VALUE")
            value = os.environ[name]
        env[name] = value
    return env
