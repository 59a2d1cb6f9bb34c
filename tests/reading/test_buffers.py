"""The readers' buffers: recycled, faulted in ahead of use, kept warm for the next stream."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from activault.reading import buffers
from activault.reading.buffers import ReadBuffers


@pytest.fixture(autouse=True)
def own_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no spare buffers (the pool is process-wide) and prefaults from 4 KiB."""
    gc.collect()  # earlier tests' streams retire their buffers now, not into this test's pool
    monkeypatch.setattr(buffers, "_spare", [])
    monkeypatch.setattr(buffers, "PREFAULT_BYTES", 4096)


def test_a_big_buffer_faults_the_next_one_in_off_the_callers_thread() -> None:
    pool = ReadBuffers(keep=3)
    a = pool.bytes(8192)
    pool.settle()
    assert pool.prefaulted() == 1  # one more, ready before it is asked for
    b = pool.bytes(8192)
    pool.settle()
    assert b.data_ptr() != a.data_ptr() and pool.prefaulted() == 1  # and the next one
    c = pool.bytes(8192)
    pool.settle()
    assert pool.prefaulted() == 0 and len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3  # keep=3: no more


def test_small_buffers_are_not_faulted_ahead() -> None:
    pool = ReadBuffers(keep=3)
    pool.bytes(64)
    pool.settle()
    assert pool.prefaulted() == 0


def test_a_dropped_streams_free_buffers_serve_the_next_one() -> None:
    first = ReadBuffers(keep=1)
    t = first.bytes(8192)
    ptr = t.data_ptr()
    del t, first
    gc.collect()
    assert buffers.spare_bytes() == 8192
    assert ReadBuffers(keep=1).bytes(8192).data_ptr() == ptr  # the same warm memory
    assert buffers.spare_bytes() == 0


def test_a_buffer_in_use_is_never_a_spare_and_spares_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "SPARE_BYTES", 3 * 8192)
    held = ReadBuffers(keep=1)
    t = held.bytes(8192)
    del held
    gc.collect()
    assert buffers.spare_bytes() == 0 and t.sum() >= 0  # still the consumer's
    for _ in range(5):
        pool = ReadBuffers(keep=1)
        pool.bytes(8192)  # handed out and dropped at once: free
        del pool
        gc.collect()
    assert buffers.spare_bytes() <= 3 * 8192


def test_tensors_read_into_a_prefaulted_buffer_keep_their_bytes() -> None:
    pool = ReadBuffers(keep=4)
    got = []
    for k in range(4):
        t = pool.bytes(8192)
        t.fill_(k)
        got.append(t)
        pool.settle()
    assert [int(t.float().mean()) for t in got] == [0, 1, 2, 3]  # no buffer handed out twice


def test_read_buffers_hand_out_memory_again_only_once_unused() -> None:
    pool = ReadBuffers(keep=2)
    a = pool.empty((4, 8), torch.float32)
    view = a[1:3]  # a view keeps the buffer in use
    del a
    b = pool.empty((4, 8), torch.float32)
    assert b.data_ptr() != view.data_ptr() - 32
    first = view.data_ptr() - 32
    del view
    c = pool.empty((4, 8), torch.float32)
    assert c.data_ptr() == first
    assert pool.empty((2, 8), torch.float32).data_ptr() not in (
        first,
        b.data_ptr(),
    )  # other sizes: new


def test_a_buffer_is_reused_only_after_its_recorded_copy() -> None:
    class Event:
        synced = 0

        def synchronize(self) -> None:
            Event.synced += 1

    pool = ReadBuffers(keep=2)
    a = pool.bytes(64)
    ptr = a.data_ptr()
    pool.copied([a[8:16]], Event())  # a view inside the buffer names it
    del a
    b = pool.bytes(48)  # a smaller request reuses the free buffer, after its copy is done
    assert b.data_ptr() == ptr and Event.synced == 1


def test_without_recycling_every_request_gets_new_memory() -> None:
    fresh, kept = ReadBuffers(recycle=False), ReadBuffers()
    a = kept.bytes(64)
    first = a.data_ptr()
    del a
    assert kept.bytes(64).data_ptr() == first
    assert fresh.bytes(64).numel() == 64 and fresh.empty((2, 4), torch.float32).shape == (2, 4)
    assert not fresh._slots  # nothing kept to hand out again


def test_read_buffers_forget_a_free_buffer_beyond_keep() -> None:
    pool = ReadBuffers(keep=2)
    a, b = pool.bytes(64), pool.bytes(64)
    del b  # free, but too small for the next request: forgotten to stay within `keep`
    c = pool.bytes(128)
    assert c.data_ptr() != a.data_ptr() and c.numel() == 128


def test_spares_of_several_sizes_hand_out_the_smallest_that_fits() -> None:
    buffers._give_spare([np.zeros(9000, np.uint8), np.zeros(12000, np.uint8), np.zeros(3000, np.uint8)])
    taken = buffers._take_spare(8192)
    assert taken is not None and taken.nbytes == 9000 and buffers.spare_bytes() == 15000
    assert buffers._take_spare(20000) is None  # none within twice the request


def test_a_user_holding_two_buffers_of_a_size_gets_no_third_faulted_in_ahead() -> None:
    # TokenLoader's batches: the consumer holds the last batch while the next is gathered.
    pool = ReadBuffers(keep=12, ahead=2)
    held = pool.bytes(8192)
    pool.settle()
    assert pool.prefaulted() == 1  # the second batch's, ready before it is asked for
    ptrs = {held.data_ptr()}
    for _ in range(6):
        held = pool.bytes(8192)  # the one before is dropped once this one is handed out
        pool.settle()
        ptrs.add(held.data_ptr())
        assert pool.prefaulted() == 0  # nothing faulted in that the consumer does not need
    assert len(ptrs) == 2 and len(pool._slots) == 2


def test_a_prefault_starts_without_waiting_for_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(threading.Thread, "start", lambda t: started.append(t.name))  # a blocking start()
    pool = ReadBuffers(keep=3)
    pool.bytes(8192)
    pool.settle()
    assert started == [] and pool.prefaulted() == 1  # faulted in, on a thread the caller never waited for
