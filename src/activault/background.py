"""A generator produced on a background thread, with errors raised to the consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetch(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """Produce `items` on a background thread, `depth` ahead: tokenizing and packing the next
    batches overlaps the forward pass. An error in the producer is raised here, in order.

    A `depth` below 1 is a ValueError at the call (queue.Queue(0) would read ahead without bound)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"prefetch depth must be a whole number >= 1 (items read ahead), got {depth!r}")
    return _prefetch(items, depth)


def _prefetch(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(("error", e))

    thread = threading.Thread(target=produce, name="activault-data", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
