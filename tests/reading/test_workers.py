"""Workers: threads started as jobs need them, lowest priority first, the rest cancelled on close."""

from __future__ import annotations

import threading

from activault.reading.workers import Workers


def test_workers_start_threads_only_as_jobs_need_them() -> None:
    workers = Workers(4, "activault-test")
    assert workers.started == 0  # none before the first job
    assert workers.submit((0,), lambda: 1).result() == 1 and workers.started == 1
    assert workers.submit((0,), lambda: 2).result() == 2 and workers.started == 1  # the idle one took it
    gate = threading.Event()
    futures = [workers.submit((0,), gate.wait, 30) for _ in range(6)]
    assert workers.started == 4  # one per waiting job, up to the bound
    workers.grow(6)
    assert workers.started == 6
    gate.set()
    assert all(f.result() for f in futures)
    workers.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("activault-test")]


def test_jobs_run_lowest_priority_first_and_close_cancels_the_rest() -> None:
    workers = Workers(1, "activault-test")
    gate, ran = threading.Event(), []
    first = workers.submit((0,), gate.wait, 30)  # holds the one thread while the others queue
    later = [workers.submit((p,), ran.append, p) for p in (3, 1, 2)]
    gate.set()
    assert first.result() and [f.result() for f in later] == [None] * 3 and ran == [1, 2, 3]
    gate.clear()
    running = threading.Event()
    blocker = workers.submit((0,), lambda: running.set() or gate.wait(30))
    assert running.wait(30)  # the one thread busy: the next job waits in the queue
    queued = workers.submit((1,), ran.append, 9)
    dropped = threading.Event()
    queued.add_done_callback(lambda _: dropped.set())
    closer = threading.Thread(target=workers.close)  # close() waits for the running job
    closer.start()
    assert dropped.wait(30) and queued.cancelled()
    gate.set()
    closer.join(30)
    assert blocker.result() and ran == [1, 2, 3] and not closer.is_alive()
