"""tools/launch/base.py without a cluster: the range check, the rank command and environment, the
wait-and-report loop (with a fake launcher), and every user error of `activault launch` as one line
naming the fix."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from activault.cli import main
from activault.errors import ConfigError
from activault.tools.launch.base import Launch, Launcher, RankResult, check_launch, run_launch
from support.launching import N


def test_check_launch_range(config: Path) -> None:
    launch = check_launch(config, N, 1, 3)
    assert (launch.n, launch.machines, launch.cfg.run_name) == (N, range(1, 4), "r")
    assert check_launch(config, N).machines == range(N)  # START 0, END N-1 by default
    assert check_launch(config, N, 2).machines == range(2, N)
    with pytest.raises(ConfigError, match=r"N=3 machines, but .* has num_runs=4: .*set num_runs: 3"):
        check_launch(config, 3, 0, 2)
    with pytest.raises(ConfigError, match=r"START=2 is after END=1; pass 0 <= START <= END < N"):
        check_launch(config, N, 2, 1)
    for start, end, flag in ((0, 4, "END 4"), (-1, 0, "START -1")):
        with pytest.raises(ConfigError, match=f"{flag} is out of range: num_runs is 4, so use 0..3"):
            check_launch(config, N, start, end)


@pytest.mark.parametrize(
    ("n", "start", "end", "match"),
    [
        (0, 0, None, "at least one machine"),
        (-2, 0, None, "at least one machine"),
        ("4", 0, None, "N must be a whole number, not '4'"),
        (True, 0, None, "N must be a whole number"),
        (N, 1.5, None, "START must be a whole number"),
        (N, 0, "3", "END must be a whole number"),
    ],
)
def test_check_launch_refuses_garbage_numbers(config: Path, n, start, end, match) -> None:
    with pytest.raises(ConfigError, match=match):
        check_launch(config, n, start, end)


def test_check_launch_refuses_a_bad_config(tmp_path: Path, config: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist; pass an existing YAML file"):
        check_launch(tmp_path / "missing.yaml", N)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        check_launch(bad, N)
    with pytest.raises(ConfigError, match="variable name '' is invalid"):
        check_launch(config, N, env={"": "x"})
    with pytest.raises(ConfigError, match="the value must be a string"):
        check_launch(config, N, env={"A": 1})  # type: ignore[dict-item]


def test_rank_command_is_the_laptop_command(config: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    launch = check_launch(config.name, N, storage="s3://b")  # a relative path: ranks start elsewhere
    assert launch.config == config and launch.config.is_absolute()
    laptop = ["collect", "--config", str(config), "--quiet", "--storage", "s3://b", "--machine", "2"]
    assert launch.command(2) == [sys.executable, "-m", "activault", *laptop]
    assert launch.command() == launch.command(2)[:-1]  # Slurm's script appends the index
    assert "--storage" not in check_launch(config, N).command(0)


@dataclass
class FakeLauncher(Launcher):
    """Ends one rank per poll, highest machine first; `fail` ends failed."""

    log_dir: Path
    fail: set[int] = field(default_factory=set)
    polls: int = 0
    name: ClassVar[str] = "fake"
    detached: ClassVar[bool] = True

    def start(self, launch: Launch) -> dict[int, str]:
        return {m: f"job{m}" for m in launch.machines}

    def ended(self, handles: dict[int, str], timeout: float) -> list[RankResult]:
        self.polls += 1
        m = max(handles)
        if m in self.fail:
            return [RankResult(m, "failed", handle=handles[m], returncode=1, error="boom")]
        return [RankResult(m, "completed", handle=handles[m], returncode=0)]


def test_run_launch_waits_reports_and_names_the_machines_to_rerun(config: Path, tmp_path: Path, caplog) -> None:
    launcher = FakeLauncher(tmp_path / "logs", fail={2})
    caplog.set_level("INFO", logger="activault")
    results = run_launch(launcher, check_launch(config, N, 1, 3), wait=True, poll=0)
    assert [(r.machine, r.status, r.handle) for r in results] == [
        (1, "completed", "job1"),
        (2, "failed", "job2"),
        (3, "completed", "job3"),
    ]
    assert launcher.polls == 3
    log = caplog.text
    assert "machine 2: FAILED (exit 1)\nboom" in log and "machine 3: completed" in log
    assert "progress: machine 1 files 0/2; machine 2 files 0/2" in log  # no record yet: nothing done
    assert "2 completed, 1 failed (rerun machines [2] to finish the run" in log
    (jobs,) = (tmp_path / "logs").glob("fake_jobs_*.txt")
    assert jobs.read_text().splitlines() == ["MACHINE | JOB", "---------------", "1 | job1", "2 | job2", "3 | job3"]
    (res,) = (tmp_path / "logs").glob("fake_results_*.json")
    rec = json.loads(res.read_text())
    assert rec["launcher"] == "fake" and rec["config"] == str(config) and rec["num_runs"] == N
    assert [r["status"] for r in rec["results"]] == ["completed", "failed", "completed"]


def test_run_launch_without_wait(config: Path, tmp_path: Path) -> None:
    launch = check_launch(config, N, 0, 1)
    detached = FakeLauncher(tmp_path / "a")
    results = run_launch(detached, launch, results_path=tmp_path / "r.json")
    assert [(r.machine, r.status, r.handle) for r in results] == [(0, "submitted", "job0"), (1, "submitted", "job1")]
    assert detached.polls == 0 and not (tmp_path / "r.json").exists()

    # Ranks that die with this process (Ray's) are waited for all the same.
    class Attached(FakeLauncher):
        detached = False

    attached = Attached(tmp_path / "b")
    results = run_launch(attached, launch, results_path=tmp_path / "r.json", poll=0)
    assert [r.status for r in results] == ["completed", "completed"] and (tmp_path / "r.json").exists()


def test_run_launch_times_out(config: Path, tmp_path: Path) -> None:
    class Never(FakeLauncher):
        def ended(self, handles: dict[int, str], timeout: float) -> list[RankResult]:
            return []

    with pytest.raises(TimeoutError, match=r"machines \[0, 1\] still running after 0s"):
        run_launch(Never(tmp_path), check_launch(config, N, 0, 1), wait=True, poll=0, timeout=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["slurm", "{config}", "3"], "N=3 machines, but {config} has num_runs=4"),
        (["ray", "{config}", "4", "3", "1"], "START=3 is after END=1"),
        (["slurm", "{config}", "4", "0", "4"], "END 4 is out of range: num_runs is 4, so use 0..3"),
        (["slurm", "{missing}", "4"], "config file {missing} does not exist"),
        (["slurm", "{config}", "4", "--script", "{missing}"], "Slurm script {missing} does not exist"),
        (["slurm", "{config}", "4", "--max-parallel", "2"], "it limits a job array, so pass --array"),
        (["slurm", "{config}", "4", "--env", "=x"], "--env '=x': no variable name"),
        (["ray", "{config}", "4", "--resources", "8"], "--resources must map resource names to numbers"),
    ],
)
def test_cli_user_errors_are_one_line(config: Path, sbatch: Path, capsys, args: list[str], message: str) -> None:
    names = {"config": config, "missing": config.parent / "missing.yaml"}
    assert main(["launch", *(a.format(**names) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("activault: error: ") and err.count("\n") == 1, err
    assert message.format(**names) in err
    assert not (sbatch / "count").exists() and not Path("logs").exists()  # nothing submitted
