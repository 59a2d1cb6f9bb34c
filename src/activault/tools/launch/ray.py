"""Ranks as Ray tasks: each runs the rank command in a subprocess on a node with the resources asked for."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from activault.errors import ConfigError
from activault.tools.launch.base import LOG_TAIL, Launch, Launcher, RankResult, check_launch, run_launch

log = logging.getLogger(__name__)


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError('Ray is not installed: pip install "activault[ray]" (or launch on Slurm)') from None
    return ray


def run_rank(cmd: list[str], machine: int) -> RankResult:
    """Body of a Ray task: run the rank command; never raises, so one failure stops no other machine."""
    t0 = time.perf_counter()
    res = RankResult(machine, "failed", node=socket.gethostname())
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
    return res


def ray_options(resources: dict[str, float] | None) -> dict[str, Any]:
    """Ray task options from a resources mapping such as {"CPU": 8, "GPU": 1, "memory": 64e9, "big": 1}."""
    r = dict(resources or {"CPU": 1})
    opts: dict[str, Any] = {"num_cpus": r.pop("CPU", 1), "max_retries": 0}  # a rerun is the user's: it resumes
    if "GPU" in r:
        opts["num_gpus"] = r.pop("GPU")
    if "memory" in r:
        opts["memory"] = r.pop("memory")
    if r:
        opts["resources"] = r
    return opts


def parse_resources(text: str | None) -> dict[str, float] | None:
    """`--resources '{"CPU": 8, "GPU": 1}'`: resource name -> amount per rank."""
    if not text:
        return None
    try:
        r = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f'--resources is not JSON ({e}); write e.g. \'{{"CPU": 8, "GPU": 1}}\'') from None
    if not isinstance(r, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in r.values()
    ):
        raise ConfigError('--resources must map resource names to numbers >= 0, e.g. {"CPU": 8, "GPU": 1}')
    return r


@dataclass
class RayLauncher(Launcher):
    """One Ray task per machine. Ray ends a driver's tasks when the driver exits, so it is waited for."""

    name: ClassVar[str] = "ray"
    detached: ClassVar[bool] = False
    address: str | None = None  # default: the cluster `ray start` made here, else a new local one
    resources: dict[str, float] | None = None  # per rank; default one CPU
    log_dir: Path = Path("logs")  # the machine -> task list and the results
    _refs: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def start(self, launch: Launch) -> dict[int, str]:
        ray = import_ray()
        opts = ray_options(self.resources)
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
            except (Exception, SystemExit) as e:  # ray.init exits (SystemExit) when the GCS never answers
                raise ConfigError(
                    f"cannot connect to Ray at {self.address or 'auto'} ({e}): start it (ray start --head) "
                    "or pass its --address"
                ) from None
        warn_infeasible(ray, opts)
        if launch.env:
            opts["runtime_env"] = {"env_vars": dict(launch.env)}
        task = ray.remote(run_rank).options(**opts)
        self._refs = {m: task.remote(launch.command(m), m) for m in launch.machines}
        log.info("Ray: %s per rank", self.resources or {"CPU": 1})
        return {m: ref.hex() for m, ref in self._refs.items()}

    def ended(self, handles: dict[int, str], timeout: float) -> list[RankResult]:
        ray = import_ray()
        refs = {self._refs[m]: m for m in handles}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        results = []
        for ref in done:
            try:
                results.append(ray.get(ref))
            except Exception:  # the task itself died (worker lost, node gone)
                results.append(RankResult(refs[ref], "failed", error=traceback.format_exc()[-LOG_TAIL:]))
            results[-1].handle = handles[refs[ref]]
        return results


def warn_infeasible(ray: ModuleType, opts: dict[str, Any]) -> None:
    """Warn when no node has what a rank asks for: Ray would wait for one silently."""
    want = {"CPU": opts["num_cpus"], "GPU": opts.get("num_gpus", 0), "memory": opts.get("memory", 0)}
    want.update(opts.get("resources", {}))
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # an older client or a cluster that hides its nodes: nothing to warn about
        return
    if not any(all(node.get(k, 0) >= v for k, v in want.items() if v) for node in nodes):
        log.warning(
            "no node of the Ray cluster has %s (nodes: %s): the ranks wait until one joins", want, nodes or "none"
        )


def launch_ray(
    config: str | Path,
    n: int,
    start: int = 0,
    end: int | None = None,
    *,
    address: str | None = None,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    storage: str | None = None,
    results_path: str | Path | None = None,
    log_dir: str | Path = "logs",
    poll: float = 5.0,
) -> list[RankResult]:
    """Run machines start..end of n as Ray tasks until they end; return each one's result."""
    launch = check_launch(config, n, start, end, env=env, storage=storage)
    launcher = RayLauncher(address, resources, Path(log_dir))
    return run_launch(launcher, launch, wait=True, results_path=results_path, poll=poll)
