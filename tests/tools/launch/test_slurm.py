"""tools/launch/slurm.py without a cluster: submissions (with a fake sbatch), job arrays, a partial
submission named, the batch script, and scontrol's records read into results. The real cluster is
tests/tools/test_distributed.py's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from activault.cli import main
from activault.errors import ConfigError
from activault.tools.launch.base import check_launch, run_launch
from activault.tools.launch.slurm import (
    SlurmLauncher,
    default_slurm_script,
    parse_scontrol,
    rank_result,
    run_seconds,
)
from support.launching import N, calls


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


def test_cli_submits_and_prints_machine_to_job(config: Path, sbatch: Path, capsys) -> None:
    assert main(["launch", "slurm", str(config), str(N), "2", "--env", "AV_TOKEN=t", "--log-dir", "out"]) == 0
    assert capsys.readouterr().out.splitlines() == ["2 | 101", "3 | 102"]
    assert [c.token for c in calls(sbatch)] == ["t", "t"] and list(Path("out").glob("slurm_jobs_*.txt"))
