"""background.py: `prefetch` yields exactly what its source yields, in order, a bounded distance ahead,
raises the producer's error in the consumer after the items before it, and leaves no thread behind."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from activault.background import prefetch

THREAD = "activault-data"


def producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


class Counting:
    """An endless source that records how many items were pulled from it."""

    def __init__(self) -> None:
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            self.pulled += 1
            yield i


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    before = set(producers())  # another test's leftovers are not this test's to judge
    yield
    assert wait_until(lambda: set(producers()) <= before, 2.0), "the producer thread outlived the test"


@pytest.mark.parametrize("depth", [1, 2, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 100])
def test_yields_the_source_in_order(depth, n):
    items = [object() for _ in range(n)]
    assert list(prefetch(iter(items), depth=depth)) == items


def test_items_are_produced_on_another_thread():
    where = []

    def source():
        for i in range(3):
            where.append(threading.current_thread())
            yield i

    assert list(prefetch(source())) == [0, 1, 2]
    assert set(where) != {threading.current_thread()} and len(set(where)) == 1
    assert where[0].name == THREAD and where[0].daemon


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_read_ahead_is_bounded_by_depth(depth):
    source = Counting()
    gen = prefetch(iter(source), depth=depth)
    taken = [next(gen) for _ in range(5)]
    # Wait until the producer is blocked on the full queue, then count what it pulled.
    assert wait_until(lambda: source.pulled >= 5 + depth)
    time.sleep(0.2)
    # `depth` in the queue and one in the producer's hand, waiting for room.
    assert taken == [0, 1, 2, 3, 4] and source.pulled <= 5 + depth + 1
    gen.close()


def test_error_in_the_producer_reaches_the_consumer_after_the_items_before_it():
    boom = ValueError("record 4 is bad")

    def source():
        yield from range(4)
        raise boom

    got = []
    with pytest.raises(ValueError) as e:
        for item in prefetch(source(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3] and e.value is boom


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3), GeneratorExit()])
def test_base_exceptions_of_the_producer_reach_the_consumer_too(exc):
    def source():
        yield 1
        raise exc

    gen = prefetch(source())
    assert next(gen) == 1
    with pytest.raises(type(exc)) as e:
        next(gen)
    assert e.value is exc


def test_an_error_on_the_first_item_is_raised_at_once():
    def source():
        raise RuntimeError("no documents")
        yield  # pragma: no cover - makes this a generator

    with pytest.raises(RuntimeError, match="no documents"):
        next(prefetch(source()))


def test_close_stops_the_producer_blocked_on_a_full_queue():
    before = set(producers())
    source = Counting()
    gen = prefetch(iter(source), depth=2)
    assert next(gen) == 0
    (thread,) = set(producers()) - before
    assert wait_until(lambda: source.pulled >= 3)
    gen.close()  # returns only once the thread has ended
    assert not thread.is_alive()
    pulled = source.pulled
    time.sleep(0.2)
    assert source.pulled == pulled <= 1 + 2 + 2, "nothing is pulled after close"


def test_breaking_out_of_the_loop_and_dropping_the_generator_ends_the_thread():
    before = set(producers())
    source = Counting()
    for item in prefetch(iter(source), depth=3):
        if item == 10:
            break
    assert wait_until(lambda: set(producers()) <= before)


def test_an_error_in_the_consumer_ends_the_thread():
    before = set(producers())
    source = Counting()
    with pytest.raises(ZeroDivisionError):
        for item in prefetch(iter(source)):
            if item == 3:
                1 / 0  # noqa: B018 - the consumer fails mid-stream
    assert wait_until(lambda: set(producers()) <= before)


def test_a_generator_never_started_starts_no_thread():
    before = set(producers())
    source = Counting()
    gen = prefetch(iter(source))
    time.sleep(0.05)
    assert set(producers()) == before and source.pulled == 0
    gen.close()


@pytest.mark.parametrize("depth", [0, -1, -100, 1.5, True, "2", None])
def test_a_depth_below_one_is_refused_at_the_call(depth):
    # queue.Queue(0) has no bound: depth 0 read the whole source ahead.
    source = Counting()
    with pytest.raises(ValueError, match="prefetch depth must be a whole number >= 1") as e:
        prefetch(iter(source), depth=depth)
    assert str(e.value).endswith(f"got {depth!r}")
    assert source.pulled == 0 and producers() == []
