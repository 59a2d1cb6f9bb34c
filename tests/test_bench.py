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
def test_read_benchmark_appends_one_json_line_of_figures_from_every_new_mode(tmp_path: Path) -> None:
    out = tmp_path / "read.jsonl"
    out.write_text('{"earlier": 1}\n')
    run_bench(
        "bench.read",
        *("--files", "2", "--mib", "1", "--d", "256", "--reps", "1", "--window", "2", "--batch-tokens", "512"),
        *("--stores", "local,proxy", "--cache", "warm"),
        *("--readers", "tokens-read,tokens-read-again,rcache-zstd,original"),
        *("--cap-mbps", "200", "--first-byte-ms", "1", "--json", str(out)),
        tmp_path=tmp_path,
    )
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": 1}  # appended, nothing lost
    got = json.loads(lines[1])
    assert got["command"].startswith("python -m bench.read --files 2") and got["date"] and got["cpus"]
    figures = {f["figure"]: f for f in got["figures"]}
    for name in (  # every figure whose two cases ran
        "TokenLoader map_reads=False / (pread + gather), page cache",
        "TokenLoader map_reads=False first batch / one file pread",
        "TokenLoader map_reads=False, warm buffers / (pread + gather), page cache",
        "RCache zstd / decode limit, page cache",
        "RCache zstd / RCache raw run, page cache",
        "RCache zstd / raw reads of the raw run, throttled S3",
        "RCache zstd / RCache raw run, throttled S3",
        "RCache / original (16 connections per file), throttled S3",
    ):
        assert len(figures[name]["ratios"]) == 1 and figures[name]["ratios"][0] > 0, name
    rows = {(r["store"], r["reader"]): r for r in got["readers"]}
    assert len(got["runs"]) == 12  # only the cases asked for and their baselines
    assert got["touch_ms_per_mib"] > 0  # what a fresh buffer costs here, which -again leaves out
    assert rows[("local", "raw-one")]["resident_before"] == [pytest.approx(1, abs=0.05)]  # warm, checked
    assert rows[("proxy", "rcache")]["gets"][0] > 0 and rows[("proxy", "rcache")]["upstream_ms_per_get"][0] > 0
    assert not any("env" in r for r in got["runs"])  # no credentials in the record


def test_figures_pair_runs_of_the_same_repetition_only() -> None:
    from bench.read import figures

    def run(reader: str, rep: int, gb_s: float, first_s: float = 0.5, seconds: float = 1.0) -> dict:
        common = {"store": "local", "cache": "warm", "steady_gb_s": gb_s}
        return {**common, "reader": reader, "rep": rep, "gb_s": gb_s, "first_s": first_s, "seconds": seconds}

    runs = [
        run("rcache", 0, 2.0, first_s=0.1),
        run("raw-map", 0, 4.0),
        run("raw-one-map", 0, 1.0, seconds=0.05),
        run("rcache", 1, 3.0),  # its baseline did not run in rep 1: no ratio
        run("raw-map", 2, 100.0),
    ]
    got = {f["figure"]: f for f in figures(runs)}
    assert got["RCache / (mmap + populate), page cache"]["ratios"] == [0.5]
    assert got["RCache first item / one mapped file, page cache"]["ratios"] == [pytest.approx(2.0)]
    assert "RCache / (pread, reused buffers), page cache" not in got


def test_cold_runs_start_from_evicted_files_and_warm_ones_from_cached_ones(tmp_path: Path) -> None:
    from activault.storage import LocalStore
    from bench.read import SEQ, write_files
    from bench.readers import child

    write_files(LocalStore(tmp_path, fsync=False), 2, 1, 256)
    case = {"store": "local", "root": str(tmp_path), "env": None, "reader": "raw", "range_size": None}
    case |= {"buffer_size": 1, "window": 2, "batch_tokens": 256, "file_bytes": SEQ * (256 * 2 + 8)}
    cold = child({**case, "cache": "cold", "cold": True})
    warm = child({**case, "cache": "warm", "cold": False})
    assert cold["resident_before"] < 0.05 and warm["resident_before"] > 0.95
    assert cold["bytes"] == warm["bytes"] > 2 * SEQ * 256 * 2


def test_an_again_reader_reads_once_untimed_then_from_the_page_cache_state_asked(tmp_path: Path) -> None:
    from activault.storage import LocalStore
    from bench.read import SEQ, write_files
    from bench.readers import child

    write_files(LocalStore(tmp_path, fsync=False), 2, 1, 256)
    case = {"store": "local", "root": str(tmp_path), "env": None, "range_size": None, "cache": "cold", "cold": True}
    case |= {"buffer_size": 1, "window": 2, "batch_tokens": 256, "file_bytes": SEQ * (256 * 2 + 8)}
    again = child({**case, "reader": "tokens-read-again"})
    once = child({**case, "reader": "tokens-read"})
    assert again["resident_before"] < 0.05  # its untimed pass read the files; evicted after it
    assert again["bytes"] == once["bytes"] == 2 * SEQ * 256 * 2  # one pass timed, every token once


def test_the_compressed_gather_floor_delivers_every_token_of_the_run_once(tmp_path: Path) -> None:
    """decode-gather (TokenLoader zstd's baseline): the zstd run decoded and gathered, every token
    once, the same rows as the raw run's gather floor."""
    import numpy as np

    from activault.storage import LocalStore
    from bench.read import SEQ, write_files
    from bench.readers import reader

    write_files(LocalStore(tmp_path, fsync=False), 2, 1, 256)
    case = {"store": "local", "root": str(tmp_path), "env": None, "range_size": None, "cache": "warm", "cold": False}
    case |= {"buffer_size": 1, "window": 2, "batch_tokens": 256, "file_bytes": SEQ * (256 * 2 + 8)}

    def rows(name: str) -> list[bytes]:
        got = [np.frombuffer(b, np.uint8).reshape(256, -1).copy() for b in reader({**case, "reader": name})]
        return sorted(r.tobytes() for batch in got for r in batch)

    decoded = rows("decode-gather")
    assert len(decoded) == 2 * SEQ and len(set(decoded)) == 2 * SEQ  # every token once
    assert decoded == rows("raw-map-gather")  # the same states as the raw run's


def test_the_read_benchmarks_runs_hold_statistics_as_collected_runs_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A progress record without a hook's statistics reads as damaged (and says to collect again)."""
    from activault.storage import LocalStore
    from activault.vault.records import read_statistics
    from bench.read import SEQ, write_files

    store = LocalStore(tmp_path, fsync=False)
    with caplog.at_level("WARNING"):
        write_files(store, 2, 1, 256)
    assert "skipping machine" not in caplog.text
    for run in ("run", "zrun"):
        stats = read_statistics(store, f"{run}/hook")
        assert stats is not None and stats.count == 2 * SEQ


def test_the_decode_limit_decodes_the_stored_chunks_exactly(tmp_path: Path) -> None:
    import torch

    from activault import RCache
    from activault.storage import LocalStore
    from bench.read import write_files
    from bench.readers import decode_limit

    store = LocalStore(tmp_path, fsync=False)
    write_files(store, 2, 2, 256)
    it = decode_limit(store, "zrun/hook")
    assert next(it).nbytes == 0  # the untimed set-up
    decoded = [t.clone() for t in it]  # one reused output tensor
    stored = list(RCache(str(tmp_path / "run" / "hook")))
    assert len(decoded) == len(stored) == 2
    for d, s in zip(decoded, stored, strict=True):
        assert torch.equal(d, s)


def test_accounting_splits_the_main_threads_time_outside_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import torch

    from activault.collection.collector import Collector
    from activault.collection.hooks import Capture
    from activault.vault.stats import RunningStats
    from bench.collect import MAIN_PARTS, Accounting

    ticks = iter(range(1000))  # a clock that moves one unit per reading: each timed call lasts 1
    monkeypatch.setattr(Capture, "__call__", lambda self, ids, *_: {})
    monkeypatch.setattr(RunningStats, "update", lambda self, x: None)
    monkeypatch.setattr(Collector, "_copy", lambda self, host, acts: RunningStats.update(None, acts))  # nested
    stats, cap, ids = RunningStats.__new__(RunningStats), Capture.__new__(Capture), torch.zeros(1, 2)
    patched = {part: getattr(owner, name) for part, (owner, name) in MAIN_PARTS.items()}
    acc = Accounting(clock=lambda: float(next(ticks)))
    with acc.active():
        stats.update(ids)  # before the model's first call: not counted
        cap(ids)
        stats.update(ids)
        stats.update(ids)
        Collector._copy(None, ids, ids)  # type: ignore[arg-type]  # counted once, as a copy
        t = threading.Thread(target=stats.update, args=(ids,))  # not the main thread: not counted
        t.start()
        t.join()
    assert acc.forward == 1 and acc.parts == {"statistics": 2, "copies out of the hook": 1}
    got = acc.breakdown(10)
    assert set(got) == {*MAIN_PARTS, "rest of the main thread"}
    assert got["statistics"] == 0.2 and got["copies out of the hook"] == 0.1
    assert got["rest of the main thread"] == pytest.approx((10 - 1 - 3) / 10)
    assert patched == {part: getattr(owner, name) for part, (owner, name) in MAIN_PARTS.items()}  # restored
    assert sum(got.values()) == pytest.approx(1 - acc.forward / 10)


def test_accounting_times_the_threads_norms_and_checksums_in_cpu_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from collections.abc import Callable

    import torch

    from activault.collection.hooks import Capture
    from activault.vault import megabatch
    from bench.collect import THREAD_PARTS, Accounting

    ticks = iter(range(1000))  # a CPU clock that moves one unit per reading: each timed call lasts 1
    monkeypatch.setattr(Capture, "__call__", lambda self, ids, *_: {})
    monkeypatch.setattr(megabatch, "token_norms", lambda states: None)
    monkeypatch.setattr(megabatch, "checksum", lambda *args: megabatch.token_norms(None))  # nested: counted once
    patched = {part: getattr(owner, name) for part, (owner, name) in THREAD_PARTS.items()}
    cap, ids = Capture.__new__(Capture), torch.zeros(1, 2)
    acc = Accounting(cpu_clock=lambda: float(next(ticks)))

    def on_a_thread(fn: Callable[[None], None]) -> None:
        t = threading.Thread(target=fn, args=(None,), name="activault-write_0")
        t.start()
        t.join()

    with acc.active():
        on_a_thread(megabatch.token_norms)  # before the model's first call: not counted
        cap(ids)
        on_a_thread(megabatch.token_norms)
        on_a_thread(megabatch.token_norms)
        on_a_thread(megabatch.checksum)
        megabatch.token_norms(None)  # the main thread: its time is the main thread's, not a thread's
    assert acc.thread_parts == {"norms in encode": 2, "checksums in encode": 1}
    assert acc.thread_breakdown(10) == {"norms in encode": 0.2, "checksums in encode": 0.1}
    assert patched == {part: getattr(owner, name) for part, (owner, name) in THREAD_PARTS.items()}  # restored


@pytest.mark.s3
def test_throttled_proxy_forwards_ranges_paces_each_answer_and_stops(moto: MotoServer, moto_bucket: str) -> None:
    import socket
    import threading

    from bench.proxy import ThrottledProxy

    class Virtual:
        """Time that moves only when the proxy sleeps: pacing checked without a timed assertion."""

        def __init__(self) -> None:
            self.now, self.sleeps = 0.0, []

        def monotonic(self) -> float:
            return self.now

        def sleep(self, s: float) -> None:
            self.sleeps.append(s)
            self.now += s

    data = os.urandom(3 << 20)
    open_store(f"s3://{moto_bucket}", env=moto.env()).put("k", data)
    before = threading.active_count()
    clock = Virtual()
    with ThrottledProxy(moto.url, cap=20e6, first_byte_s=0.05, clock=clock) as proxy:
        store = open_store(f"s3://{moto_bucket}", env=moto.env(proxy.url))
        assert bytes(store.get_range("k", 10, 5000)) == data[10:5000]
        n = proxy.snapshot()
        clock.sleeps.clear()
        clock.now = 0.0
        assert bytes(store.get_range("k", 1000, 1000 + (2 << 20))) == data[1000 : 1000 + (2 << 20)]
        # The first byte after the latency, then the body no faster than the cap.
        assert clock.sleeps[0] == 0.05 and clock.now == pytest.approx(0.05 + (2 << 20) / 20e6)
        got = proxy.snapshot()
        # Forwarded as a range: upstream sent the range's bytes, not the object.
        assert got["ranged"] - n["ranged"] == 1 and got["body_bytes"] - n["body_bytes"] == 2 << 20
        assert bytes(store.get("k")) == data
        with pytest.raises(NotFoundError):
            store.get_range("missing", 0, 10)
        url = proxy.url
    assert threading.active_count() == before  # every handler thread ended with it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()


@pytest.mark.s3
def test_compression_benchmark_reads_against_the_decode_limit(tmp_path: Path) -> None:
    out = tmp_path / "compression.json"
    args = ("--sections", "read", "--read-mib", "3", "--read-files", "2", "--rounds", "1", "--s3-rate", "50")
    run_bench("bench.compression", *args, "--out", str(out), tmp_path=tmp_path)
    got = json.loads(out.read_text())
    assert got["file_mib"] >= 3 and got["files"] == 2 and "ratios" not in got  # only the section asked for
    for where in ("read_local", "read_s3"):
        r = got[where]
        assert r["limit_GB_s"] > 0 and r["rcache_zstd_over_limit"] > 0 and r["rcache_ratio"] > 0
    assert got["read_s3"]["throttle"]["MB_s_per_connection"] == 50 and got["read_local"]["loader_ratio"] > 0


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


def test_mixing_benchmark_reads_the_same_tokens_both_ways_and_appends_one_json_line(tmp_path: Path) -> None:
    out = tmp_path / "mixing.jsonl"
    out.write_text('{"earlier": 1}\n')
    args = ("--files", "4", "--mib", "1", "--d", "256", "--reps", "2", "--batch-tokens", "512", "--window", "2")
    printed = run_bench("bench.mixing", *args, "--json", str(out), tmp_path=tmp_path).stdout.splitlines()
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": 1}  # appended, nothing lost
    got = json.loads(lines[1])
    assert json.loads(printed[-1]) == got  # the same line printed
    assert got["command"].startswith("python -m bench.mixing --files 4") and got["date"] and got["cpus"]
    assert got["same_tokens"] and got["tokens"] == 4 * 2 * 1024  # 4 files of 2 rows of 1024 tokens
    assert len(got["ratios"]) == len(got["cpu_ratios"]) == 2 and all(r > 0 for r in got["ratios"])
    assert got["min"] <= got["median"] <= got["max"] and got["goal"] == ">= 0.95"
    for r in got["runs"]:  # every token of the epoch read, both ways, in every repetition
        assert r["single_tokens"] == r["mixed_tokens"] == got["tokens"]
    assert [r["rep"] for r in got["runs"]] == [0, 1]
    assert not list(tmp_path.glob("activault-bench-mixing-*"))  # the runs written are removed


def test_shuffle_benchmark_pairs_a_copy_and_a_shuffle_in_each_repetition(tmp_path: Path) -> None:
    out = tmp_path / "shuffle.jsonl"
    args = ("--files", "24", "--rows", "4", "--seq", "16", "--d", "256", "--reps", "2", "--json", str(out))
    printed = run_bench("bench.shuffle", *args, tmp_path=tmp_path).stdout.strip().splitlines()
    got = json.loads(out.read_text())
    assert json.loads(printed[-1]) == got and got["command"].startswith("python -m bench.shuffle --files 24")
    assert [r["rep"] for r in got["runs"]] == [0, 1] and got["ratios"] == [r["ratio"] for r in got["runs"]]
    for r in got["runs"]:  # memory half the run: several buckets, within the stated bound
        assert r["copy_s"] > 0 and r["shuffle_s"] > 0 and r["buckets"] > 1 and r["peak_tokens"] <= r["bound_tokens"]
    assert not list(tmp_path.glob("activault-bench-*"))  # its run, copies and shuffles removed


def test_a_benchmark_records_its_figures_without_git_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's commands need no git (a fresh machine may have none): the stamp says "" instead."""
    from bench import record

    monkeypatch.setenv("PATH", "/nonexistent")
    got = record.stamp("bench.read", ["--files", "2"])
    assert (got["commit"], got["dirty"], got["command"]) == ("", False, "python -m bench.read --files 2")
