"""What a launch is, and what every launcher shares: the range check, the rank command, waiting, the report.

A launcher (`slurm.py`, `ray.py`) only starts ranks and says when one has ended. Every rank runs the
command a laptop runs, `activault collect --config CONFIG --machine i`: sharding, resume and statistics
stay `collect`'s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from activault.config import Config, load_config, resolve_storage
from activault.errors import ActivaultError, ConfigError
from activault.storage import open_store
from activault.storage.uri import is_s3
from activault.vault.records import read_progress

log = logging.getLogger(__name__)

LOG_TAIL = 4000  # characters of a failed rank's output kept in its result


@dataclass(frozen=True)
class Launch:
    """Machines start..end of a run; rank i runs `activault collect --config CONFIG --machine i`."""

    config: Path  # absolute: every rank reads the same path (a shared filesystem)
    cfg: Config
    start: int
    end: int
    env: dict[str, str] = field(default_factory=dict)  # for every rank, over the environment it starts in
    storage: str | None = None  # collect's --storage

    @property
    def n(self) -> int:
        return self.cfg.num_runs

    @property
    def machines(self) -> range:
        return range(self.start, self.end + 1)

    def command(self, machine: int | None = None) -> list[str]:
        """Rank `machine`'s command; without a machine it ends in `--machine`, for the launcher to complete.

        The interpreter is this one: ranks find it at the same path, as they find the config.
        """
        cmd = [sys.executable, "-m", "activault", "collect", "--config", str(self.config), "--quiet"]
        cmd += ["--storage", self.storage] if self.storage else []
        return [*cmd, "--machine", *([] if machine is None else [str(machine)])]


def check_launch(
    config: str | Path,
    n: int,
    start: int = 0,
    end: int | None = None,
    *,
    env: dict[str, str] | None = None,
    storage: str | None = None,
) -> Launch:
    """Load the config and check machines start..end (default N-1) of n against it, before anything starts.

    N must equal the config's `num_runs`: each machine's share depends on it, so a typo would start
    machines that collect overlapping data.
    """
    for name, value in (("N", n), ("START", start), ("END", end)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if n < 1:
        raise ConfigError(f"N={n}: a run has at least one machine; pass N equal to the config's num_runs")
    cfg = load_config(config)
    if n != cfg.num_runs:
        raise ConfigError(
            f"N={n} machines, but {config} has num_runs={cfg.num_runs}: each machine's share depends on "
            f"num_runs, so set num_runs: {n} in the config (or pass N={cfg.num_runs})"
        )
    end = n - 1 if end is None else end
    if start > end:
        raise ConfigError(f"START={start} is after END={end}; pass 0 <= START <= END < N")
    cfg.check_machine(start, "START")
    cfg.check_machine(end, "END")
    return Launch(Path(config).absolute(), cfg, start, end, check_env(env or {}), storage or None)


def check_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse names a process environment cannot hold; return a copy."""
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ConfigError(f"environment variable name {name!r} is invalid; pass NAME=VALUE with a non-empty NAME")
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"environment variable {name}: the value must be a string without NUL, not {value!r}")
    return dict(env)


def parse_env(items: list[str] | None) -> dict[str, str]:
    """`--env NAME=VALUE`, or `--env NAME` to pass this process's value on."""
    env: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not name:
            raise ConfigError(f"--env {item!r}: no variable name; pass NAME=VALUE")
        if not eq:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this environment; pass NAME=VALUE")
            value = os.environ[name]
        env[name] = value
    return check_env(env)


@dataclass
class RankResult:
    """How one machine's rank ended, or that it was submitted (when not waited for)."""

    machine: int
    status: Literal["submitted", "completed", "failed"]
    handle: str = ""  # the Slurm job or Ray task that runs it
    returncode: int | None = None
    seconds: float = 0.0
    node: str = ""
    error: str = ""  # the end of the rank's output, when it failed


class Launcher(ABC):
    """How ranks are started and waited for on one kind of cluster; everything else is `run_launch`'s."""

    name: ClassVar[str]
    detached: ClassVar[bool]  # whether ranks keep running after the launching process exits
    log_dir: Path

    @abstractmethod
    def start(self, launch: Launch) -> dict[int, str]:
        """Start one rank per machine of the launch; return {machine: handle}. Checks come first."""

    @abstractmethod
    def ended(self, handles: dict[int, str], timeout: float) -> list[RankResult]:
        """Wait up to `timeout` seconds; return the results of the ranks among `handles` that have ended."""


def run_launch(
    launcher: Launcher,
    launch: Launch,
    *,
    wait: bool = False,
    results_path: str | Path | None = None,
    poll: float = 5.0,
    timeout: float | None = None,
) -> list[RankResult]:
    """Start every rank; with `wait` (or when ranks end with this process) wait and report them.

    Writes `{log_dir}/{launcher}_jobs_{time}.txt` (machine -> handle) once started, and after waiting
    the results as JSON to `results_path` (default `{log_dir}/{launcher}_results_{time}.json`).
    """
    handles = launcher.start(launch)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    jobs_file = write_handles(launcher.log_dir / f"{launcher.name}_jobs_{stamp}.txt", handles)
    log.info(
        "started machines %d..%d of %d on %s; machine -> %s in %s",
        launch.start,
        launch.end,
        launch.n,
        launcher.name,
        "job" if launcher.detached else "task",
        jobs_file,
    )
    if not wait and launcher.detached:
        return [RankResult(m, "submitted", handle=h) for m, h in handles.items()]
    if not wait:
        log.info("waiting for them: %s ends a driver's tasks when the driver exits", launcher.name)
    results = wait_ranks(launcher, launch, handles, poll=poll, timeout=timeout)
    path = Path(results_path or launcher.log_dir / f"{launcher.name}_results_{stamp}.json")
    report(launch, launcher.name, results, path)
    return results


def write_handles(path: Path, handles: dict[int, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["MACHINE | JOB", "---------------", *(f"{m} | {h}" for m, h in handles.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_ranks(
    launcher: Launcher, launch: Launch, handles: dict[int, str], *, poll: float, timeout: float | None
) -> list[RankResult]:
    """Log each rank as it ends, and the others' progress meanwhile, until all have ended."""
    progress = progress_reader(launch)
    deadline = None if timeout is None else time.monotonic() + timeout
    results: dict[int, RankResult] = {}
    while len(results) < len(handles):
        for r in launcher.ended({m: h for m, h in handles.items() if m not in results}, poll):
            results[r.machine] = r
            if r.status == "completed":
                log.info("machine %d: completed in %.1fs", r.machine, r.seconds)
            else:
                log.error("machine %d: FAILED (exit %s)\n%s", r.machine, r.returncode, r.error)
        pending = {m: h for m, h in handles.items() if m not in results}
        if pending:
            log.info("progress: %s", "; ".join(f"machine {m} {progress(m)}" for m in pending))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"machines {list(pending)} still running after {timeout}s: {pending}")
    return [results[m] for m in sorted(results)]


def progress_reader(launch: Launch) -> Callable[[int], str]:
    """`files k/n` (or `finished`) from a machine's progress record, as the ranks see the store.

    It only informs: an unreadable record or store reads as such, and never stops the wait.
    """
    try:
        env = {**os.environ, **launch.env}
        uri = resolve_storage(launch.cfg, launch.storage, env)
        store = open_store(uri, env=env) if is_s3(uri) else open_store(uri)
    except ActivaultError as e:
        reason = str(e).split("; ")[0]
        return lambda m: f"progress unknown ({reason})"

    def read(machine: int) -> str:
        try:
            rec = read_progress(store, launch.cfg.run_name, machine)
        except ActivaultError as e:  # a damaged record, or the store unreachable for a moment
            return f"progress unreadable ({str(e).split('; ')[0]})"
        if rec is not None and rec.finished:
            return f"finished ({rec.files_done} files)"
        planned = launch.cfg.machine_files(machine)  # None: until the data runs out
        return f"files {rec.files_done if rec else 0}/{'?' if planned is None else planned}"

    return read


def report(launch: Launch, launcher: str, results: list[RankResult], path: Path) -> None:
    """Log the outcome, naming the machines to rerun, and write the results as JSON."""
    failed = [r.machine for r in results if r.status == "failed"]
    log.info(
        "%d completed, %d failed%s",
        len(results) - len(failed),
        len(failed),
        f" (rerun machines {failed} to finish the run: each resumes, START=END=i)" if failed else "",
    )
    rec = {"launcher": launcher, "config": str(launch.config), "num_runs": launch.n}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**rec, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    log.info("results in %s", path)
