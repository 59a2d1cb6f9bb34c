"""Ranks as Slurm jobs: one job per machine, or one job array, each running the packaged batch script."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar

from activault.errors import ConfigError
from activault.tools.launch.base import LOG_TAIL, Launch, Launcher, RankResult, check_launch, run_launch

# Job states after which a job never runs again (squeue/scontrol JOB STATE CODES).
FINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)
NO_SLURM = "run this on a Slurm login node (or start a local cluster: scripts/slurm_local.sh start)"


def default_slurm_script() -> Path:
    """The batch script shipped with the package, found wherever activault is run from."""
    return Path(str(resources.files("activault").joinpath("tools/collect.slurm")))


@dataclass
class SlurmLauncher(Launcher):
    """`sbatch SCRIPT COMMAND`: the script runs the rank command with its machine index appended
    (the array task id in a job array, else $MACHINE); job output goes to `{log_dir}/activault-JOB.out`."""

    name: ClassVar[str] = "slurm"
    detached: ClassVar[bool] = True
    script: str | Path | None = None  # default: the packaged collect.slurm
    array: bool = False
    max_parallel: int | None = None  # with `array`: tasks running at once
    sbatch_args: list[str] = field(default_factory=list)
    log_dir: Path = Path("logs")

    def check(self) -> Path:
        """Refuse what would fail at submission, before any job is submitted; return the script."""
        script = Path(self.script) if self.script is not None else default_slurm_script()
        if not script.is_file():
            raise ConfigError(
                f"Slurm script {script} does not exist; pass --script PATH, or leave it out for the packaged one"
            )
        if self.max_parallel is not None and (not self.array or self.max_parallel < 1):
            raise ConfigError(
                f"--max-parallel {self.max_parallel}: it limits a job array, so pass --array and a number >= 1"
            )
        if shutil.which("sbatch") is None:
            raise ConfigError(f"sbatch not found on PATH: {NO_SLURM}")
        return script

    def start(self, launch: Launch) -> dict[int, str]:
        script = self.check()
        out = Path(self.log_dir).absolute()
        out.mkdir(parents=True, exist_ok=True)
        # The rank's environment is sbatch's: --export=ALL hands it to the job (a later --sbatch-arg wins).
        base = ["sbatch", "--parsable", "--export=ALL", *self.sbatch_args]
        env = {**os.environ, **launch.env}
        if self.array:
            spec = f"{launch.start}-{launch.end}" + (f"%{self.max_parallel}" if self.max_parallel else "")
            cmd = [*base, f"--array={spec}", f"--output={out / 'activault-%A_%a.out'}", str(script)]
            job = sbatch([*cmd, *launch.command()], env)
            return {m: f"{job}_{m}" for m in launch.machines}
        # A launch from inside an array task must not hand its task id on: the script would prefer it.
        env.pop("SLURM_ARRAY_TASK_ID", None)
        jobs: dict[int, str] = {}
        for m in launch.machines:
            cmd = [*base, f"--job-name=activault-m{m}", f"--output={out / 'activault-%j.out'}", str(script)]
            try:
                jobs[m] = sbatch([*cmd, *launch.command()], {**env, "MACHINE": str(m)})
            except ConfigError as e:
                if not jobs:
                    raise
                raise ConfigError(
                    f"{e}; machines {list(jobs)} were submitted (jobs {list(jobs.values())}): "
                    f"submit the rest with START={m}"
                ) from None
        return jobs

    def ended(self, handles: dict[int, str], timeout: float) -> list[RankResult]:
        records = job_records(list(handles.values()))
        done = [rank_result(m, j, records[j]) for m, j in handles.items() if records[j].get("JobState") in FINAL]
        if not done:
            time.sleep(timeout)  # Slurm has no call that blocks until a job ends: poll
        return done


def sbatch(cmd: list[str], env: dict[str, str]) -> str:
    """Submit; return the job id."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise ConfigError(f"sbatch not found: {NO_SLURM}") from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch failed ({shlex.join(cmd)}): {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]  # --parsable: JOB[;CLUSTER]


def job_records(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """`scontrol show job` fields of each job (array tasks as `JOB_TASK`); `{}` for a job it does not list.

    An array job still pending shows as one record `JOB_[a-b]`: its tasks have none until they start.
    """
    text = []
    for job in sorted({j.split("_")[0] for j in job_ids}):
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        except FileNotFoundError:
            raise ConfigError(f"scontrol not found: {NO_SLURM}") from None
        text.append(out.stdout)
    records = parse_scontrol("\n".join(text))
    return {j: records.get(j, {}) for j in job_ids}


def parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """{job id: fields} from `scontrol -o show job` (one job per line, `Key=Value` pairs)."""
    records = {}
    for line in text.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" not in f:
            continue
        job = f["JobId"]
        if f.get("ArrayJobId") and f.get("ArrayTaskId", "").isdigit():
            job = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
        records[job] = f
    return records


def rank_result(machine: int, job: str, f: dict[str, str]) -> RankResult:
    """A finished job's result; a failed one's error is its state and the end of its output file."""
    state = f.get("JobState", "UNKNOWN")
    code = f.get("ExitCode", "").split(":")[0]  # EXIT:SIGNAL
    r = RankResult(machine, "completed" if state == "COMPLETED" else "failed", handle=job)
    r.returncode = int(code) if code.isdigit() else None
    r.seconds = run_seconds(f.get("RunTime", ""))
    r.node = f.get("NodeList", "")
    if r.status == "failed":
        r.error = f"job {job} ended {state}"
        stdout = f.get("StdOut", "")
        try:
            r.error += f"; the end of {stdout}:\n" + Path(stdout).read_text(errors="replace")[-LOG_TAIL:]
        except OSError:  # not on this filesystem, or not written
            r.error += f"; its output: {stdout or 'unknown'}"
    return r


def run_seconds(runtime: str) -> float:
    """Seconds from Slurm's `[D-]HH:MM:SS`; 0 if unreadable."""
    days, _, hms = runtime.rpartition("-")
    try:
        h, m, s = (int(x) for x in hms.split(":"))
        return float(int(days or 0) * 86400 + h * 3600 + m * 60 + s)
    except ValueError:
        return 0.0


def submit_slurm(
    config: str | Path,
    n: int,
    start: int = 0,
    end: int | None = None,
    *,
    script: str | Path | None = None,
    array: bool = False,
    max_parallel: int | None = None,
    sbatch_args: list[str] | None = None,
    log_dir: str | Path = "logs",
    env: dict[str, str] | None = None,
    storage: str | None = None,
) -> dict[int, str]:
    """Submit machines start..end of n (one job each, or one job array); return {machine: job id}."""
    launch = check_launch(config, n, start, end, env=env, storage=storage)
    launcher = SlurmLauncher(script, array, max_parallel, list(sbatch_args or []), Path(log_dir))
    return {r.machine: r.handle for r in run_launch(launcher, launch)}
