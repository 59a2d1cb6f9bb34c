"""One collector per (run, machine): the local flock and the S3 lease refuse a second holder while
the first lives, name it, and never let a killed holder block a resume. Store.swap is the
conditional write the lease is built on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from activault.errors import LockedError
from activault.storage import LocalStore, Store
from activault.storage.lock import hold, lock_key
from activault.storage.s3 import S3Store
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
