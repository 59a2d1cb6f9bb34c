"""Distributed collection: N machines collect exactly one machine's documents, statistics merge exactly,
a killed machine reruns alone; end to end on a real local Ray cluster and a real local Slurm cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from activault.collection.packing import encode_document
from activault.collection.pipeline import collect
from activault.config import parse_config
from activault.tools.tiny import demo_texts
from activault.vault.megabatch import decode
from support.synth import create_bucket, s3_env

HOOKS = ["models.layers.1.post", "models.layers.0.mlp.post"]
N = 3


def raw_config(model: Path, corpus: Path, storage: str, num_runs: int = N) -> dict:
    return {
        "run_name": "dist",
        "num_runs": num_runs,
        "storage": storage,
        "transformer_config": {"model_name": str(model), "dtype": "float32", "device": "cpu"},
        # n_batches far beyond the corpus: every machine's data runs out, so each collects all of its share
        "data_config": {
            "data_key": str(corpus),
            "n_batches": 600,
            "seq_length": 32,
            "batch_size": 2,
            "clean_added_tokens": True,
            "clean_default_system_prompt": True,
        },
        "upload_config": {"batches_per_upload": 2, "hooks": HOOKS},
    }


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "activault", *args], capture_output=True, text=True, **kw)


def tree_bytes(files: dict[str, bytes]) -> dict[str, bytes]:
    """A run's files, cfg.json without `storage` (the one thing that differs between copies)."""
    out = dict(files)
    if "cfg.json" in out:
        rec = json.loads(out["cfg.json"])
        rec["config"].pop("storage")
        out["cfg.json"] = json.dumps(rec).encode()
    return out


def local_tree(root: Path) -> dict[str, bytes]:
    """Every file of a local run but the hidden temp files a SIGKILLed write leaves (never read)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return tree_bytes({str(p.relative_to(root)): p.read_bytes() for p in files})


def s3_tree(url: str, bucket: str, run: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{run}/")
        for o in page.get("Contents", [])
    ]
    return tree_bytes({k[len(run) + 1 :]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys})


def assert_same_run(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


def machine_tensors(root: Path, hook: str, machine: int) -> dict[str, torch.Tensor]:
    files = sorted((root / hook).glob(f"m{machine:05d}-*.safetensors"))
    parts = [decode(f.read_bytes(), f.name, verify_checksums=True).tensors for f in files]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def stored_documents(root: Path, machines: range | list[int]) -> Counter[tuple[int, ...]]:
    """Documents reassembled from stored input_ids + positions: a document's positions increase;
    one that does not increase starts the next document (rows continue across files of a machine)."""
    docs: Counter[tuple[int, ...]] = Counter()
    for m in machines:
        t = machine_tensors(root, HOOKS[0], m)
        cur: list[int] = []
        prev = -1
        for tok, pos in zip(t["input_ids"].reshape(-1).tolist(), t["positions"].reshape(-1).tolist(), strict=True):
            if pos < 0:
                continue  # padding: only at the end of a machine's data
            if pos <= prev and cur:
                docs[tuple(cur)] += 1
                cur = []
            cur.append(tok)
            prev = pos
        if cur:
            docs[tuple(cur)] += 1
    return docs


@pytest.fixture(scope="module")
def llama(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A finite local corpus: 60 short documents."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_texts()[:60]))
    return path


@pytest.fixture(scope="module")
def one(llama, corpus, tmp_path_factory) -> Path:
    """The 1-machine run of the corpus."""
    out = tmp_path_factory.mktemp("one")
    collect(parse_config(raw_config(llama, corpus, str(out), num_runs=1)), show_progress=False)
    return out / "dist"


@pytest.fixture(scope="module")
def three(llama, corpus, tmp_path_factory) -> Path:
    """The 3-machine run, machines run one after another in this process."""
    out = tmp_path_factory.mktemp("three")
    cfg = parse_config(raw_config(llama, corpus, str(out)))
    for m in range(N):
        collect(cfg, machine=m, show_progress=False)
    return out / "dist"


# ---------------------------------------------------------------- sharding and statistics


def test_three_machines_collect_exactly_the_documents_of_one(one, three, llama, corpus):
    expected: Counter[tuple[int, ...]] = Counter()
    tok = AutoTokenizer.from_pretrained(llama)
    for line in corpus.read_text().splitlines():
        ids, keep = encode_document(
            json.loads(line)["text"], tok, clean_added_tokens=True, clean_default_system_prompt=True
        )
        if any(keep):
            expected[tuple(i for i, k in zip(ids, keep, strict=True) if k)] += 1
    assert sum(expected.values()) == 60
    got_one, got_three = stored_documents(one, [0]), stored_documents(three, range(N))
    assert got_one == expected  # every document once, whole
    assert got_three == got_one  # no duplicates, no gaps
    assert [sum(stored_documents(three, [m]).values()) for m in range(N)] == [20, 20, 20]


def test_file_names_progress_and_run_record(three):
    rec = json.loads((three / "cfg.json").read_text())
    assert rec["num_runs"] == N
    assert rec["progress"] == [f"progress/machine-{m:05d}.json" for m in range(N)]
    for m in range(N):
        p = json.loads((three / rec["progress"][m]).read_text())
        assert p["machine"] == m and p["num_runs"] == N and p["finished"]
        names = sorted(f.name for f in (three / HOOKS[0]).glob(f"m{m:05d}-*.safetensors"))
        assert names == [f"m{m:05d}-{k:06d}.safetensors" for k in range(p["files_done"])]
        assert sorted(f.name for f in (three / HOOKS[1]).glob(f"m{m:05d}-*")) == names


def test_merged_statistics_equal_numpy_float64_over_all_machines(three):
    for hook in HOOKS:
        parts = [machine_tensors(three, hook, m) for m in range(N)]
        x = np.concatenate(
            [
                p["states"].reshape(-1, p["states"].shape[-1])[p["positions"].reshape(-1) >= 0].double().numpy()
                for p in parts
            ]
        )
        st = json.loads((three / hook / "statistics.json").read_text())
        assert st["machines"] == [0, 1, 2] and st["count"] == len(x)
        np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st["std"], x.std(0), rtol=1e-6)
        np.testing.assert_allclose(st["norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-6)


def test_merge_stats_command_recomputes_statistics(three, tmp_path):
    copy = tmp_path / "dist"
    shutil.copytree(three, copy)
    for hook in HOOKS:
        (copy / hook / "statistics.json").unlink()
    out = cli("merge-stats", str(copy))
    assert out.returncode == 0, out.stderr
    assert "[0, 1, 2]" in out.stdout
    for hook in HOOKS:
        assert (copy / hook / "statistics.json").read_bytes() == (three / hook / "statistics.json").read_bytes()
    bad = cli("merge-stats", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "no cfg.json" in bad.stderr


@pytest.mark.slow
def test_killed_machine_reruns_alone_to_the_same_data(three, llama, corpus, tmp_path):
    raw = raw_config(llama, corpus, str(tmp_path))
    path = write_config(raw, tmp_path / "c.yaml")
    cfg = parse_config(raw)
    for m in (0, 2):
        collect(cfg, machine=m, show_progress=False)
    progress = tmp_path / "dist/progress/machine-00001.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "activault", "collect", "--config", str(path), "--machine", "1", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["files_done"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    assert proc.poll() is None, "machine 1 finished before it could be killed; make its share longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads(progress.read_text())["finished"]
    others = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in (tmp_path / "dist").rglob("*")
        if p.is_file()
        and ("m00000" in p.name or "m00002" in p.name or "-00000.json" in p.name or "-00002.json" in p.name)
    }
    assert len(others) > 4
    done = cli("collect", "--config", str(path), "--machine", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in others} == others  # untouched
    assert_same_run(local_tree(tmp_path / "dist"), local_tree(three))


# ---------------------------------------------------------------- refusals


def test_machine_index_out_of_range_is_refused(llama, corpus, tmp_path):
    path = write_config(raw_config(llama, corpus, str(tmp_path)), tmp_path / "c.yaml")
    out = cli("collect", "--config", str(path), "--machine", "3")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--machine 3 is out of range: num_runs is 3, so use 0..2" in out.stderr
    out = cli("launch", "ray", str(path), "3", "0", "3")
    assert out.returncode == 2 and "END 3 is out of range: num_runs is 3, so use 0..2" in out.stderr


def test_joining_a_run_with_another_num_runs_is_refused(three, llama, corpus, tmp_path):
    before = local_tree(three)
    path = write_config(raw_config(llama, corpus, str(three.parent), num_runs=2), tmp_path / "c.yaml")
    out = cli("collect", "--config", str(path), "--machine", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "num_runs: stored 3, this config 2" in out.stderr
    assert "restore the stored value(s) to continue this run, or set a new run_name" in out.stderr
    assert local_tree(three) == before


def test_launchers_refuse_n_other_than_num_runs(llama, corpus, tmp_path):
    path = write_config(raw_config(llama, corpus, str(tmp_path)), tmp_path / "c.yaml")
    for kind in ("slurm", "ray"):
        out = cli("launch", kind, str(path), "2", "0", "1", cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert "N=2 machines, but" in out.stderr and "has num_runs=3" in out.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "dist").exists()


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_address():
    """A real local Ray cluster (this process is its driver); its GCS address for other drivers."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, logging_level="WARNING")
    address = ctx.address_info["gcs_address"]
    assert address.startswith("127.0.0.1:"), address  # conftest binds Ray to loopback
    yield address
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_failed_worker_is_reported_and_rerun_completes_the_run(ray_address, three, llama, corpus, tmp_path):
    path = write_config(raw_config(llama, corpus, str(tmp_path)), tmp_path / "c.yaml")
    bad = tmp_path / "dist/progress/machine-00001.json"
    bad.parent.mkdir(parents=True)
    # A record whose cursor is garbage: machine 1 fails (one message naming the record); 0 and 2 carry on.
    bad.write_text(json.dumps({"machine": 1, "num_runs": 3, "files_done": 0, "data_state": "garbage"}))
    results = tmp_path / "results.json"
    out = cli(
        "launch",
        "ray",
        str(path),
        "3",
        "0",
        "2",
        "--address",
        ray_address,
        "--resources",
        '{"CPU": 1}',
        "--results",
        str(results),
        cwd=tmp_path,
    )
    assert out.returncode == 1 and results.exists(), out.stderr
    res = {r["machine"]: r for r in json.loads(results.read_text())["results"]}
    assert [res[m]["status"] for m in range(N)] == ["completed", "failed", "completed"]
    assert "machine-00001.json" in res[1]["error"] and "Traceback" not in res[1]["error"]
    assert "machine 1: FAILED" in out.stderr and "rerun machines [1]" in out.stderr
    assert "machine 0: completed" in out.stderr
    assert "waiting for them: ray ends a driver's tasks" in out.stderr  # no --wait: Ray waits all the same

    bad.unlink()
    out = cli(
        "launch",
        "ray",
        str(path),
        "3",
        "1",
        "1",
        "--address",
        ray_address,
        "--wait",
        "--results",
        str(results),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert [r["status"] for r in json.loads(results.read_text())["results"]] == ["completed"]
    assert_same_run(local_tree(tmp_path / "dist"), local_tree(three))


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_ray_to_s3(ray_address, moto_url, three, llama, corpus, tmp_path):
    from activault.tools.launch import launch_ray

    create_bucket(moto_url, "ray-run")
    path = write_config(raw_config(llama, corpus, "s3://ray-run"), tmp_path / "c.yaml")
    results = launch_ray(path, N, env=s3_env(moto_url), results_path=tmp_path / "r.json", log_dir=tmp_path, poll=1.0)
    assert [(r.machine, r.status) for r in results] == [(m, "completed") for m in range(N)], results
    assert_same_run(s3_tree(moto_url, "ray-run", "dist"), local_tree(three))


# ---------------------------------------------------------------- Slurm


SBATCH_LOCAL = [
    "--sbatch-arg=--gres=none",
    "--sbatch-arg=--mem=2G",
    "--sbatch-arg=--cpus-per-task=1",
    "--sbatch-arg=--time=20",
]


def run_slurm(path: Path, cwd: Path, start: int, end: int, *extra: str) -> tuple[int, list[dict], str]:
    """`activault launch slurm --wait` on machines START..END: its exit code, results (handle: the job in
    the machine -> job list) and log."""
    logs = cwd / f"logs-{start}-{end}"
    args = [str(path), str(N), str(start), str(end), *SBATCH_LOCAL, *extra, "--wait", "--log-dir", str(logs)]
    out = cli("launch", "slurm", *args, cwd=cwd, timeout=300)
    assert list(logs.glob("slurm_results_*.json")), out.stderr
    (jobs,) = logs.glob("slurm_jobs_*.txt")
    (res,) = logs.glob("slurm_results_*.json")
    results = json.loads(res.read_text())["results"]
    assert [f"{r['machine']} | {r['handle']}" for r in results] == jobs.read_text().splitlines()[2:]
    return out.returncode, results, out.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_failed_job_is_reported_and_rerun_completes_the_run(slurm, three, llama, corpus, tmp_path):
    path = write_config(raw_config(llama, corpus, str(tmp_path / "vault")), tmp_path / "c.yaml")
    bad = tmp_path / "vault/dist/progress/machine-00001.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"machine": 1, "num_runs": 3, "files_done": 0, "data_state": "garbage"}))
    code, results, log = run_slurm(path, tmp_path, 0, 2)
    assert code == 1, log
    assert [r["status"] for r in results] == ["completed", "failed", "completed"], results
    assert len({r["handle"] for r in results}) == N  # one job per machine
    job, error = results[1]["handle"], results[1]["error"]
    assert error.startswith(f"job {job} ended FAILED; the end of") and "machine-00001.json" in error, error
    assert results[1]["returncode"] == 2 and "Traceback" not in error
    assert "machine 1: FAILED" in log and "rerun machines [1]" in log

    bad.unlink()
    code, results, log = run_slurm(path, tmp_path, 1, 1)
    assert code == 0 and [r["status"] for r in results] == ["completed"], log
    assert_same_run(local_tree(tmp_path / "vault/dist"), local_tree(three))


@pytest.mark.slurm
@pytest.mark.s3
@pytest.mark.slow
def test_slurm_job_array_to_s3(slurm, moto_url, three, llama, corpus, tmp_path):
    create_bucket(moto_url, "slurm-run")
    path = write_config(raw_config(llama, corpus, "s3://slurm-run"), tmp_path / "c.yaml")
    env = [f"--env={k}={v}" for k, v in s3_env(moto_url).items()]  # through sbatch's environment
    code, results, log = run_slurm(path, tmp_path, 0, N - 1, "--array", *env)
    assert code == 0 and [r["status"] for r in results] == ["completed"] * N, log
    assert len({r["handle"].split("_")[0] for r in results}) == 1  # one array job
    assert_same_run(s3_tree(moto_url, "slurm-run", "dist"), local_tree(three))
