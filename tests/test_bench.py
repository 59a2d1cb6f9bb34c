"""The benchmarks still run (at toy sizes); the servers they start serve exact bytes and die with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from activault.errors import NotFoundError
from activault.storage import open_store
from support.s3servers import MotoServer, ThrottleProxy

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.s3
def test_read_benchmark_runs_every_reader(tmp_path: Path) -> None:
    out = tmp_path / "read.json"
    run_bench(
        "bench.read",
        *("--files", "3", "--mib", "1", "--d", "256", "--reps", "1", "--window", "2"),
        *("--stores", "local,proxy", "--readers", "rcache,tokens,original", "--out", str(out)),
        tmp_path=tmp_path,
    )
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["store"], r["cache"], r["reader"]) for r in rows}
    for reader in ("raw-one", "raw", "rcache", "tokens", "original"):
        assert ("local", "warm", reader) in seen and ("proxy", "-", reader) in seen
    for r in rows:
        assert r["gb_s"][0] > 0 and r["first_s"][0] > 0 and r["peak_rss_mib"][0] > 0


def test_collect_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "collect.json"
    run_bench("bench.collect", "--quick", "--reps", "1", "--out", str(out), tmp_path=tmp_path)
    got = json.loads(out.read_text())
    assert got["collect"]["ratio"] > 0 and got["writer"]["ratio"] > 0 and got["checksums"]["ratio"] > 0
    assert got["collect"]["plain_writes_ratio"] > 0 and got["collect"]["collect_over_plain_writes"] > 0
    runs = got["collect"]["runs_tok_s"]
    assert len(runs["forward"]) == 2 and all(len(runs[k]) == 1 for k in ("full", "nosums", "plain"))
    assert 0 <= got["collect"]["storage_wait_share"][1] < 1
    shares = got["collect"]["accounted_shares"]
    # Every thread of a collection is accounted for under its name, and nothing before the clock
    # (the weights' loading threads) is.
    assert set(shares["collection"]) == {"main", "activault-data", "activault-write", "activault-commit"}
    assert set(shares["control"]) == {"main", "plain-write"}
    assert all(0 < v < 1 for side in shares.values() for v in side.values())
    assert got["collect"]["accounted_ratio"] == pytest.approx(1 - sum(shares["collection"].values()))
    assert 0 < got["collect"]["forward_run_to_run"][0] <= got["collect"]["forward_run_to_run"][1]


def test_accounting_counts_the_time_outside_the_model_and_the_threads_ending_after_its_first_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import torch

    from activault.collection.hooks import Capture
    from bench.collect import Accounting

    def model_call(self: Capture, input_ids: torch.Tensor, *_: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(0.5 if input_ids.device.type == "meta" else 0.05)  # told apart without timing
        return {}

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def run_thread(name: str, seconds: float) -> None:
        t = threading.Thread(target=spin, args=(seconds,), name=name)
        t.start()
        t.join()

    monkeypatch.setattr(Capture, "__call__", model_call)  # the model: 50 ms a call, the probe 0.5 s
    run = threading.Thread.run
    cap = Capture.__new__(Capture)
    ids = torch.zeros(1, 4, dtype=torch.long)
    acc = Accounting()
    t0 = time.perf_counter()
    with acc.active():
        cap(ids.to("meta"), ids, ids)  # the shape probe: not the model's time
        run_thread("loader_0", 0.05)  # ends before the model's first call: before the clock
        cap(ids, ids, ids)
        run_thread("worker_0", 0.05)
        run_thread("worker_1", 0.05)
    seconds = time.perf_counter() - t0
    assert set(acc.threads) == {"worker"} and 0.1 <= acc.threads["worker"] < 0.13  # CPU seconds
    assert 0.05 <= acc.forward < 0.5  # the real call, not the probe
    shares = acc.shares(seconds)
    assert shares["main"] == pytest.approx((seconds - acc.forward) / seconds)
    assert shares["worker"] == pytest.approx(acc.threads["worker"] / seconds)
    assert Capture.__call__ is model_call and threading.Thread.run is run  # both restored


@pytest.mark.s3
def test_pacing_proxy_serves_exact_ranges_at_its_pace(moto: MotoServer, moto_bucket: str) -> None:
    data = os.urandom(3 << 20)
    open_store(f"s3://{moto_bucket}", env=moto.env()).put("k", data)
    with ThrottleProxy(moto.url, rate=20e6, latency_s=0.05) as proxy:
        store = open_store(f"s3://{moto_bucket}", env=moto.env(proxy.url))
        assert bytes(store.get_range("k", 10, 5000)) == data[10:5000]
        assert bytes(store.get_range("k", (3 << 20) - 7, 3 << 20)) == data[-7:]
        t0 = time.perf_counter()
        assert bytes(store.get_range("k", 0, 2 << 20)) == data[: 2 << 20]
        # Not a speed check: the proxy's sleeps set a floor (latency, then all but its last chunk paced).
        assert time.perf_counter() - t0 >= 0.95 * (0.05 + ((2 << 20) - proxy.chunk) / 20e6)
        assert bytes(store.get("k")) == data and store.size("k") == len(data)
        with pytest.raises(NotFoundError):
            store.get_range("missing", 0, 10)


@pytest.mark.s3
def test_a_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from support.s3servers import MotoServer\n"
        "print(MotoServer().start().proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        server = int(parent.stdout.readline())
        os.kill(server, 0)  # running
    finally:
        parent.kill()  # SIGKILL: no finally, no atexit in the parent
        parent.wait()
    for _ in range(100):
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(server, 9)
    pytest.fail("the S3 server outlived the process that started it")
