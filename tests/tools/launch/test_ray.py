"""tools/launch/ray.py without a cluster: --env and --resources into Ray's options, a rank's failure
reported without raising, and a missing sbatch or Ray named. The real cluster is
tests/tools/test_distributed.py's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from activault.cli import main
from activault.errors import ConfigError
from activault.tools.launch.base import parse_env
from activault.tools.launch.ray import parse_resources, ray_options, run_rank
from support.launching import N


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


def test_cli_names_missing_sbatch_and_ray(config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["launch", "slurm", str(config), str(N)]) == 2
    assert "sbatch not found on PATH: run this on a Slurm login node" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as if not installed
    assert main(["launch", "ray", str(config), str(N)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'Ray is not installed: pip install "activault[ray]"' in err
