"""The background writer: bounded memory, errors surfaced, commits after the data they count,
no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from activault.errors import StorageError
from activault.storage import LocalStore
from activault.vault.writer_threads import StagingBuffers, Writer
from support.slow_store import SlowStore


def test_pool_bounds_memory_and_blocks_producer(tmp_path):
    store = SlowStore(tmp_path, delay=0.05)
    writer = Writer(store, threads=4)
    pool = StagingBuffers((4, 4), torch.float32, count=2)
    written_before = []  # writes finished when each buffer was handed out
    for i in range(6):
        buf = pool.acquire(writer.check)
        with store.lock:
            written_before.append(len(store.order))
        buf.fill_(i)
        writer.write(f"f{i}", [memoryview(buf.numpy()).cast("B")], on_done=lambda b=buf: pool.release(b))
    writer.close()
    # Two buffers: the third and later are handed out only once a write has freed one (counts, not time).
    assert written_before[:2] == [0, 0]
    assert all(n >= i - 1 for i, n in enumerate(written_before) if i >= 2)
    assert pool.waited > 0  # the producer blocked on storage, and it was counted
    free = StagingBuffers((4, 4), torch.float32, count=2)
    free.acquire(), free.acquire()
    assert free.waited == 0.0  # a free buffer is not a wait
    for i in range(6):
        assert torch.equal(
            torch.frombuffer(bytearray((tmp_path / f"f{i}").read_bytes()), dtype=torch.float32),
            torch.full((16,), float(i)),
        )


def test_failed_write_is_raised_and_commit_skipped(tmp_path):
    store = SlowStore(tmp_path, delay=0.0, fail_on="bad")
    writer = Writer(store, threads=2)
    committed = []
    with pytest.raises(StorageError, match="disk full"):
        f1 = writer.write("good", [b"x"])
        f2 = writer.write("bad", [b"y"])
        writer.commit([f1, f2], lambda: committed.append(1))  # raises here if the failure came first
        writer.flush()
    assert committed == []
    with pytest.raises(StorageError):
        writer.write("later", [b"z"])
    writer.abort()


def test_commits_run_in_order_after_their_data(tmp_path):
    store = SlowStore(tmp_path, delay=0.02)
    writer = Writer(store, threads=4)
    for k in range(5):
        futs = [writer.write(f"d{k}-{h}", [b"x" * 10]) for h in range(3)]
        writer.commit(futs, lambda k=k: store.put(f"progress{k}", b"p"))
    writer.close()
    pos = {key: i for i, key in enumerate(store.order)}
    for k in range(5):
        assert all(pos[f"d{k}-{h}"] < pos[f"progress{k}"] for h in range(3))
        if k:
            assert pos[f"progress{k - 1}"] < pos[f"progress{k}"]


def test_no_threads_left_after_close(tmp_path):
    before = set(threading.enumerate())
    writer = Writer(LocalStore(tmp_path), threads=3)
    for i in range(5):
        writer.write(f"x{i}", [b"abc"])
    writer.close()
    assert [t for t in threading.enumerate() if t not in before and t.name.startswith("activault")] == []


def test_abort_while_a_commit_waits_for_a_dropped_write_returns(tmp_path):
    # abort() drops queued writes; a commit waiting for one of them must give up, not wait forever
    # (a cancelled future never wakes concurrent.futures.wait: the run hung instead of raising).
    release = threading.Event()

    class Blocking(LocalStore):
        def put(self, key, data):
            if key == "first":
                release.wait(10)
            super().put(key, data)

    writer = Writer(Blocking(tmp_path, fsync=False), threads=1)
    writer.write("first", [b"1"])  # running: holds the only write thread
    second = writer.write("second", [b"2"])  # queued: dropped by abort()
    committed = []
    writer.commit([second], lambda: committed.append(True))
    time.sleep(0.1)  # the commit thread is now waiting for `second`
    aborting = threading.Thread(target=writer.abort)
    aborting.start()
    deadline = time.monotonic() + 10
    while not second.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    aborting.join(10)
    assert not aborting.is_alive(), "abort() hung on a commit waiting for a dropped write"
    assert second.cancelled() and committed == [] and not (tmp_path / "second").exists()
