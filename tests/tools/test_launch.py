"""The launchers' shared part without a cluster: the range check, the rank command and environment, the
wait-and-report loop (with a fake launcher), Slurm's submissions (with a fake sbatch) and batch script,
and every user error as one line naming the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from activault.cli import main
from activault.errors import ConfigError
from activault.tools.launch import (
    Launch,
    Launcher,
    RankResult,
    SlurmLauncher,
    check_launch,
    default_slurm_script,
    parse_env,
    parse_resources,
    ray_options,
    run_launch,
    run_rank,
)
from activault.tools.launch.slurm import parse_scontrol, rank_result, run_seconds

N = 4


@pytest.fixture
def config(tmp_path: Path) -> Path:
    raw = {
        "run_name": "r",
        "num_runs": N,
        "storage": str(tmp_path / "vault"),
        "transformer_config": {"model_name": "m"},
        "data_config": {"data_key": "x.jsonl", "n_batches": 8, "seq_length": 8, "batch_size": 1},
        "upload_config": {"batches_per_upload": 1, "hooks": ["models.layers.0.post"]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- what a launch is


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


def test_parse_env_and_resources(monkeypatch) -> None:
    monkeypatch.setenv("AV_TEST_VAR", "v")
    assert parse_env(["AV_TEST_VAR", "B=2=3", "C="]) == {"AV_TEST_VAR": "v", "B": "2=3", "C": ""}
    assert parse_env(None) == {}
    with pytest.raises(ConfigError, match="not set in this environment; pass NAME=VALUE"):
        parse_env(["AV_SURELY_UNSET_VAR"])
    with pytest.raises(ConfigError, match="no variable name; pass NAME=VALUE"):
        parse_env(["=x"])
    assert ray_options(None) == {"num_cpus": 1, "max_retries": 0}
    opts = ray_options(parse_resources('{"CPU": 8, "GPU": 2, "memory": 1e9, "a100": 1}'))
    assert opts == {"num_cpus": 8, "num_gpus": 2, "memory": 1e9, "resources": {"a100": 1}, "max_retries": 0}
    assert parse_resources(None) is None and parse_resources("") is None
    with pytest.raises(ConfigError, match="not JSON"):
        parse_resources("{CPU: 8}")
    for garbage in ('{"CPU": "many"}', '{"CPU": -1}', '{"GPU": true}', "[1, 2]", "3"):
        with pytest.raises(ConfigError, match="map resource names to numbers >= 0"):
            parse_resources(garbage)


def test_rank_reports_failure_without_raising() -> None:
    ok = run_rank([sys.executable, "-c", "pass"], 0)
    assert ok.status == "completed" and ok.machine == 0 and ok.returncode == 0 and ok.node
    bad = run_rank([sys.executable, "-c", "raise RuntimeError('boom')"], 5)
    assert bad.status == "failed" and bad.machine == 5 and bad.returncode == 1
    assert "Traceback" in bad.error and "RuntimeError: boom" in bad.error
    missing = run_rank(["/nonexistent/python"], 6)
    assert missing.status == "failed" and "FileNotFoundError" in missing.error


# ---------------------------------------------------------------- the shared wait and report


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


# ---------------------------------------------------------------- Slurm without a cluster

FAKE_SBATCH = """#!/bin/bash
n=$(( $(cat "$FAKE/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE/count"
printf '%s\\n' "MACHINE=${MACHINE:-}" "TOKEN=${AV_TOKEN:-}" "ARRAY_TASK=${SLURM_ARRAY_TASK_ID:-}" "$@" > "$FAKE/call$n"
if [ "$n" = "${FAIL_AT:-0}" ]; then echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; fi
echo "$((100 + n));cluster"
"""


@pytest.fixture
def sbatch(tmp_path: Path, monkeypatch) -> Path:
    """A fake `sbatch` first on PATH: it records its arguments and environment, and prints a job id."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.chdir(tmp_path)
    return fake


@dataclass
class Call:
    """One sbatch call: the variables the job would see, and sbatch's arguments."""

    machine: str
    token: str
    task: str
    args: list[str]


def calls(fake: Path) -> list[Call]:
    out = []
    for i in range(1, int((fake / "count").read_text()) + 1):
        machine, token, task, args = (fake / f"call{i}").read_text().split("\n", 3)
        values = [v.split("=", 1)[1] for v in (machine, token, task)]
        out.append(Call(values[0], values[1], values[2], args.splitlines()))
    return out


def test_slurm_jobs_run_the_rank_command(config: Path, sbatch: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")  # launched from an array task: not handed on
    launch = check_launch(config, N, 1, 2, env={"AV_TOKEN": "secret"})
    launcher = SlurmLauncher(sbatch_args=["--partition=gpu"], log_dir=tmp_path / "logs")
    results = run_launch(launcher, launch)
    assert [(r.machine, r.handle) for r in results] == [(1, "101"), (2, "102")]
    script = str(default_slurm_script())
    for m, call in zip((1, 2), calls(sbatch), strict=True):
        args = call.args
        assert args[:4] == ["--parsable", "--export=ALL", "--partition=gpu", f"--job-name=activault-m{m}"]
        assert args[4] == f"--output={tmp_path / 'logs' / 'activault-%j.out'}"
        # what the job runs: the script's arguments with its machine index appended = the laptop command
        assert args[5] == script and [*args[6:], call.machine] == launch.command(m)
        assert call.token == "secret" and call.task == ""  # the environment travels through sbatch's


def test_slurm_job_array(config: Path, sbatch: Path, tmp_path: Path) -> None:
    launcher = SlurmLauncher(array=True, max_parallel=2, log_dir=tmp_path / "logs")
    results = run_launch(launcher, check_launch(config, N, 1, 3))
    assert [(r.machine, r.handle) for r in results] == [(1, "101_1"), (2, "101_2"), (3, "101_3")]
    (call,) = calls(sbatch)
    assert "--array=1-3%2" in call.args and call.machine == ""
    assert call.args[-len(check_launch(config, N).command()) :] == check_launch(config, N).command()


def test_slurm_partial_submission_names_what_was_submitted(config: Path, sbatch: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAIL_AT", "3")
    with pytest.raises(ConfigError) as e:
        run_launch(SlurmLauncher(), check_launch(config, N))
    msg = str(e.value)
    assert "QOSMaxSubmitJobPerUserLimit" in msg
    assert "machines [0, 1] were submitted (jobs ['101', '102']): submit the rest with START=2" in msg


def test_batch_script_appends_the_machine_index(tmp_path: Path) -> None:
    script = default_slurm_script()

    def job(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k not in ("MACHINE", "SLURM_ARRAY_TASK_ID")}
        return subprocess.run(["bash", str(script), *args], env={**base, **env}, capture_output=True, text=True)

    assert job("echo", "collect", "--machine", MACHINE="3").stdout.splitlines()[-1] == "collect --machine 3"
    array = job("echo", "--machine", MACHINE="3", SLURM_ARRAY_TASK_ID="5")
    assert array.stdout.splitlines()[-1] == "--machine 5"  # an array task's own index wins
    lost = job("echo", "--machine")
    assert lost.returncode != 0 and "set MACHINE=i for one machine, or submit a job array" in lost.stderr
    bare = job(MACHINE="0")
    assert bare.returncode == 2 and "usage: sbatch collect.slurm COMMAND" in bare.stderr


SCONTROL = """JobId=12 JobName=activault ArrayJobId=10 ArrayTaskId=2 JobState=FAILED Reason=NonZeroExitCode \
ExitCode=1:0 RunTime=1-02:03:04 NodeList=n1 StdOut={out}
JobId=13 JobName=activault ArrayJobId=10 ArrayTaskId=3 JobState=COMPLETED ExitCode=0:0 RunTime=00:00:07 NodeList=n2
JobId=10 JobName=activault ArrayJobId=10 ArrayTaskId=4-5 JobState=PENDING ExitCode=0:0 RunTime=00:00:00
JobId=20 JobName=activault-m0 JobState=RUNNING ExitCode=0:0 RunTime=00:00:01 NodeList=n1
slurm_load_jobs error: Invalid job id specified
"""


def test_scontrol_records_to_results(tmp_path: Path) -> None:
    out = tmp_path / "activault-10_2.out"
    out.write_text("x" * 10_000 + "ConfigError: machine-00002.json is damaged\n")
    records = parse_scontrol(SCONTROL.format(out=out))
    assert sorted(records) == ["10", "10_2", "10_3", "20"]  # pending tasks 4-5 are still one record
    failed = rank_result(2, "10_2", records["10_2"])
    assert (failed.status, failed.returncode, failed.node, failed.seconds) == ("failed", 1, "n1", 93784.0)
    assert failed.error.startswith(f"job 10_2 ended FAILED; the end of {out}:")
    assert failed.error.endswith("machine-00002.json is damaged\n") and len(failed.error) < 4200
    done = rank_result(3, "10_3", records["10_3"])
    assert (done.status, done.returncode, done.seconds, done.error) == ("completed", 0, 7.0, "")
    gone = rank_result(0, "20", {"JobState": "NODE_FAIL", "StdOut": str(tmp_path / "none.out")})
    assert gone.status == "failed" and gone.error == f"job 20 ended NODE_FAIL; its output: {tmp_path / 'none.out'}"
    assert [run_seconds(t) for t in ("00:01:05", "2-00:00:00", "", "garbage")] == [65.0, 172800.0, 0.0, 0.0]


# ---------------------------------------------------------------- the CLI: one line per user error


def test_cli_submits_and_prints_machine_to_job(config: Path, sbatch: Path, capsys) -> None:
    assert main(["launch", "slurm", str(config), str(N), "2", "--env", "AV_TOKEN=t", "--log-dir", "out"]) == 0
    assert capsys.readouterr().out.splitlines() == ["2 | 101", "3 | 102"]
    assert [c.token for c in calls(sbatch)] == ["t", "t"] and list(Path("out").glob("slurm_jobs_*.txt"))


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


def test_cli_names_missing_sbatch_and_ray(config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["launch", "slurm", str(config), str(N)]) == 2
    assert "sbatch not found on PATH: run this on a Slurm login node" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as if not installed
    assert main(["launch", "ray", str(config), str(N)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'Ray is not installed: pip install "activault[ray]"' in err
