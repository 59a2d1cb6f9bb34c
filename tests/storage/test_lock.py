"""One collector per (run, machine): the local flock and the S3 lease refuse a second holder while
the first lives, name it, and never let a killed holder block a resume; a holder that lost the
machine (partitioned past its lease) cannot write over the new holder's records. Store.swap is the
conditional write the lease and the progress record are built on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from activault.errors import LockedError
from activault.storage import LocalStore, Store
from activault.storage.base import LOCKS, Buffer
from activault.storage.lock import MachineLock, hold, lock_key
from activault.storage.s3 import S3Store
from activault.tools.verify import verify_run
from activault.vault.records import RunRecord, hook_metadata, progress_key, read_progress
from activault.vault.stats import RunningStats
from activault.vault.writer import RunWriter
from support.synth import create_bucket, s3_env

HOST_ROOT = os.uname().nodename


@pytest.fixture
def s3(moto_url: str, request: pytest.FixtureRequest) -> S3Store:
    bucket = f"lock-{request.node.name.lower().replace('_', '-').replace('[', '-').rstrip(']')}"[:60]
    create_bucket(moto_url, bucket)
    return S3Store(f"s3://{bucket}/root", env=s3_env(moto_url))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, local: LocalStore) -> Store:
    return local if request.param == "local" else request.getfixturevalue("s3")


def holder_process(store: Store, moto_url: str | None, lease: float = 120) -> subprocess.Popen[str]:
    """A process that claims run/machine 0, says so, then calls check() until it fails (exit 3)."""
    code = textwrap.dedent(f"""
        import sys, time
        from activault.errors import LockedError
        from activault.storage import open_store
        from activault.storage.lock import hold
        claim = hold(open_store({store.uri!r}), "run", 0, {lease})
        print("held", flush=True)
        try:
            while True:
                claim.check()
                time.sleep(0.05)
        except LockedError as e:
            print(e, flush=True)
            sys.exit(3)
    """)
    env = {**os.environ, **(s3_env(moto_url) if moto_url else {})}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_refused_with_the_first_ones_host_pid_and_start(store: Store) -> None:
    with hold(store, "run", 0, lease_seconds=30):
        with pytest.raises(LockedError) as e:
            hold(store, "run", 0, lease_seconds=30)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and HOST_ROOT in msg and "running since" in msg
        assert "run 'run' machine 0" in msg
        with hold(store, "run", 1, lease_seconds=30):  # another machine index is another claim
            pass
        assert [e.key for e in store.list("run")] == [], "the lock is hidden from listings"
        assert store.list_dir("run") == ([], [])
    with hold(store, "run", 0, lease_seconds=30):  # released: free again
        pass
    assert store.size(lock_key("run", 0)) is None, "a released claim leaves nothing behind"


def test_local_lock_of_a_killed_process_never_blocks(local: LocalStore) -> None:
    proc = holder_process(local, None)
    try:
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            hold(local, "run", 0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (local.root / lock_key("run", 0)).exists(), "the killed holder left its lock file"
    with hold(local, "run", 0):  # the kernel dropped its lock: taken at once
        pass


def test_s3_lease_is_renewed_while_its_holder_lives(s3: S3Store) -> None:
    with hold(s3, "run", 0, lease_seconds=2.5) as claim:
        first = bytes(s3.get(lock_key("run", 0)))
        time.sleep(5)  # two lease periods: only renewals keep it
        claim.check()
        assert bytes(s3.get(lock_key("run", 0))) != first, "renewed"
        with pytest.raises(LockedError, match="is being collected by"):
            hold(s3, "run", 0, lease_seconds=2.5)


def test_s3_lease_of_a_killed_holder_on_this_machine_is_taken_over_at_once(s3: S3Store, moto_url: str) -> None:
    proc = holder_process(s3, moto_url)
    with pytest.raises(LockedError) as e:
        hold(s3, "run", 0)
    assert f"pid {proc.pid}" in str(e.value) and "expires at" in str(e.value)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with hold(s3, "run", 0) as claim:  # its pid is gone from this machine: no need to wait for expiry
        claim.check()


def test_s3_lease_of_another_machine_is_taken_over_once_expired(s3: S3Store) -> None:
    now = time.time()
    other = {
        "host": "node-17",
        "pid": 4242,
        "started": "earlier",
        "token": "t",
        "pids": "another-boot/1",
        "renewed": "just now",
        "renewed_at": now,
        "expires_at": now + 2,
    }
    s3.put(lock_key("run", 0), json.dumps(other).encode())
    with pytest.raises(LockedError, match="host node-17, pid 4242, running since earlier"):
        hold(s3, "run", 0)
    deadline = time.monotonic() + 60
    while True:  # refused until its last renewal is 2 s old, then taken over
        try:
            claim = hold(s3, "run", 0)
            break
        except LockedError:
            assert time.monotonic() < deadline, "the expired lease was never taken over"
            time.sleep(0.2)
    assert time.time() > other["expires_at"]
    claim.check()
    claim.release()


def test_s3_holder_paused_past_its_lease_stops_after_a_takeover(s3: S3Store, moto_url: str) -> None:
    """A holder frozen (a paused VM) past its lease is taken over, and stops when it wakes."""
    proc = holder_process(s3, moto_url, lease=1.5)
    proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                claim = hold(s3, "run", 0, lease_seconds=30)
                break
            except LockedError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert "taken over" in out or "could not be renewed" in out
    claim.check()
    holder = bytes(s3.get(lock_key("run", 0)))
    assert f'"pid": {os.getpid()}'.encode() in holder, "the woken holder did not remove the new lease"
    claim.release()


def test_swap_is_a_conditional_write(store: Store) -> None:
    assert store.swap("k", b"one", None)
    assert not store.swap("k", b"two", None), "create only if absent"
    assert not store.swap("k", b"two", b"not what it holds")
    assert store.swap("k", b"two", b"one")
    assert bytes(store.get("k")) == b"two"
    assert not store.swap("absent", b"x", b"anything")
    assert store.size("absent") is None
    assert [e.key for e in store.list()] == ["k"], "no temp files or side files listed"


class Partition:
    """One collector's side of a network partition: while cut, its lease renewals and progress
    records wait until `healed` is set (requests in flight through the cut, landing late); files go
    through."""

    def __init__(self) -> None:
        self.cut = False
        self.healed = threading.Event()
        self.record_waiting = threading.Event()  # a progress record is in flight through the cut

    def through(self, key: str) -> None:
        if self.cut and (f"/{LOCKS}/" in key or "/progress/" in key):
            if "/progress/" in key:
                self.record_waiting.set()
            assert self.healed.wait(60)


class _Cut:
    partition: Partition

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        self.partition.through(key)
        super().put(key, data)  # type: ignore[misc]

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        self.partition.through(key)
        return super().swap(key, data, expect)  # type: ignore[misc]


class CutLocal(_Cut, LocalStore):
    pass


class CutS3(_Cut, S3Store):
    pass


HOOKS, ROWS, SEQ, D = ["h1", "h2"], 2, 4, 3


def collector(store: Store, claim: MachineLock) -> RunWriter:
    record = RunRecord(run_name="run", hooks=HOOKS, num_runs=1, tokenizer="t", model={"d_model": D})
    meta = {
        h: hook_metadata(
            run_name="run",
            hook=h,
            d_model=D,
            dtype=torch.float32,
            seq_length=SEQ,
            rows_per_file=ROWS,
            batch_size=ROWS,
            batches_per_upload=1,
            model="m",
        )
        for h in HOOKS
    }
    writer = RunWriter(store, record, meta, claim=claim, threads=2)
    writer.join()
    return writer


def write_file(writer: RunWriter, stats: dict[str, RunningStats]) -> None:
    """File `writer.files`, the same bytes from any collector (collection is deterministic)."""
    k = writer.files
    g = torch.Generator().manual_seed(k)
    states = {h: torch.randn(ROWS, SEQ, D, generator=g) for h in HOOKS}
    for h in HOOKS:
        stats[h].update(states[h].reshape(-1, D))
    ids = torch.randint(0, 100, (ROWS, SEQ), generator=g, dtype=torch.int32)
    pos = torch.arange(SEQ, dtype=torch.int32).expand(ROWS, SEQ).contiguous()
    writer.write_file(states, ids, pos, tokens=ROWS * SEQ, data_state={"k": k + 1}, stats=stats)


def take_over(store: Store) -> MachineLock:
    """B claims machine 0 while A believes it still holds it."""
    if isinstance(store, LocalStore):  # an flock holds while its process lives: its lock file removed
        store.path_of(lock_key("run", 0)).unlink()
        return hold(store, "run", 0)
    deadline = time.monotonic() + 60
    while True:  # A's renewals are cut off: B takes over once A's lease expires
        try:
            return hold(store, "run", 0, lease_seconds=30)
        except LockedError:
            assert time.monotonic() < deadline, "A's lease was never taken over"
            time.sleep(0.1)


def test_a_holder_partitioned_past_its_lease_cannot_undo_the_run_its_taker_finished(
    store: Store, request: pytest.FixtureRequest
) -> None:
    """Issue 28: A's record in flight when it is cut off from the store lands after B took over and
    finished. It is refused, naming the machine and B; B's finished record stands; verify agrees."""
    partition = Partition()
    if isinstance(store, LocalStore):
        a_store: Store = CutLocal(store.root, fsync=False)
    else:
        a_store = CutS3(store.uri, env=s3_env(request.getfixturevalue("moto_url")))
    a_store.partition = partition  # type: ignore[attr-defined]
    a_claim = hold(a_store, "run", 0, lease_seconds=3)  # renewed each 0.75 s until the cut
    a = collector(a_store, a_claim)
    a_stats = {h: RunningStats(D) for h in HOOKS}
    for _ in range(2):
        write_file(a, a_stats)
    a.flush()
    partition.cut = True
    write_file(a, a_stats)  # file 2 is written; its record waits in the cut
    assert partition.record_waiting.wait(30)

    with take_over(store) as b_claim:
        b = collector(store, b_claim)
        assert b.resumed.files_done == 2
        b_stats = {h: b.resumed.stats[h].running() for h in HOOKS}
        for _ in range(2):
            write_file(b, b_stats)
        assert b.finish({"k": 4}, b_stats) == [0]
        finished = bytes(store.get(progress_key("run", 0)))
        partition.healed.set()
        with pytest.raises(LockedError) as e:
            a.flush()
        msg = str(e.value)
        assert "run 'run' machine 0 was taken over" in msg and "counts 4 files, finished" in msg
        assert f"pid {os.getpid()}" in msg and "(this collector)" not in msg, "names B, the holder now"
        a.abort()
        a_claim.release()
        assert bytes(store.get(progress_key("run", 0))) == finished, "B's finished record, byte for byte"
    rec = read_progress(store, "run", 0)
    assert rec is not None and rec.finished and rec.files_done == 4
    checked = verify_run(store, "run")
    assert not checked.problems, checked.problems
    assert not [n for n in checked.notes if "has not finished" in n], checked.notes
