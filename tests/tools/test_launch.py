"""Launcher helpers without a cluster: argument checks, Ray options, the worker command."""

from __future__ import annotations

import sys

import pytest
import yaml

from activault.errors import ConfigError
from activault.tools.launch import (
    _run_worker,
    check_launch,
    collect_command,
    parse_env,
    parse_resources,
    ray_options,
)


@pytest.fixture
def config(tmp_path):
    raw = {
        "run_name": "r",
        "num_runs": 4,
        "storage": str(tmp_path),
        "transformer_config": {"model_name": "m"},
        "data_config": {"data_key": "x.jsonl", "n_batches": 8, "seq_length": 8, "batch_size": 1},
        "upload_config": {"batches_per_upload": 1, "hooks": ["models.layers.0.post"]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_check_launch(config):
    assert check_launch(config, 4, 1, 3).num_runs == 4
    with pytest.raises(ConfigError, match=r"N=3 machines, but .* has num_runs=4: .*set num_runs: 3"):
        check_launch(config, 3, 0, 2)
    for start, end in ((2, 1), (0, 4), (-1, 0)):
        with pytest.raises(ConfigError, match=r"is after END|out of range: num_runs is 4, so use 0..3"):
            check_launch(config, 4, start, end)


def test_collect_command_is_the_laptop_command(config):
    cmd = collect_command(config, 2, "s3://b")
    assert cmd[:3] == [sys.executable, "-m", "activault"]
    assert cmd[3:] == ["collect", "--config", str(config), "--machine", "2", "--quiet", "--storage", "s3://b"]


def test_ray_options_and_parsing(monkeypatch):
    assert ray_options(None) == {"num_cpus": 1, "max_retries": 0}
    opts = ray_options(parse_resources('{"CPU": 8, "GPU": 2, "memory": 1e9, "a100": 1}'))
    assert opts == {"num_cpus": 8, "num_gpus": 2, "memory": 1e9, "resources": {"a100": 1}, "max_retries": 0}
    with pytest.raises(ConfigError, match="not JSON"):
        parse_resources("{CPU: 8}")
    with pytest.raises(ConfigError, match="map resource names to numbers"):
        parse_resources('{"CPU": "many"}')
    monkeypatch.setenv("AV_TEST_VAR", "v")
    assert parse_env(["AV_TEST_VAR", "B=2=3"]) == {"AV_TEST_VAR": "v", "B": "2=3"}
    with pytest.raises(ConfigError, match="not set"):
        parse_env(["AV_SURELY_UNSET_VAR"])


def test_worker_reports_failure_without_raising():
    ok = _run_worker([sys.executable, "-c", "pass"], 0)
    assert ok["status"] == "completed" and ok["machine"] == 0 and ok["returncode"] == 0
    bad = _run_worker([sys.executable, "-c", "raise RuntimeError('boom')"], 5)
    assert bad["status"] == "failed" and bad["machine"] == 5 and bad["returncode"] == 1
    assert "Traceback" in bad["error"] and "RuntimeError: boom" in bad["error"]
    missing = _run_worker(["/nonexistent/python"], 6)
    assert missing["status"] == "failed" and "FileNotFoundError" in missing["error"]
