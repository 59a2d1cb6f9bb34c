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


@pytest.mark.s3
def test_pacing_proxy_serves_exact_ranges_at_its_pace() -> None:
    server = MotoServer().start()
    try:
        server.create_bucket("paced")
        data = os.urandom(3 << 20)
        open_store("s3://paced", env=server.env()).put("k", data)
        with ThrottleProxy(server.url, rate=20e6, latency_s=0.05) as proxy:
            store = open_store("s3://paced", env=server.env(proxy.url))
            assert bytes(store.get_range("k", 10, 5000)) == data[10:5000]
            assert bytes(store.get_range("k", (3 << 20) - 7, 3 << 20)) == data[-7:]
            t0 = time.perf_counter()
            assert bytes(store.get_range("k", 0, 2 << 20)) == data[: 2 << 20]
            # Not a speed check: the proxy's sleeps set a floor (latency, then all but its last chunk paced).
            assert time.perf_counter() - t0 >= 0.95 * (0.05 + ((2 << 20) - proxy.chunk) / 20e6)
            assert bytes(store.get("k")) == data and store.size("k") == len(data)
            with pytest.raises(NotFoundError):
                store.get_range("missing", 0, 10)
    finally:
        server.stop()


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
