"""The codec's threads: one process-wide pool, one thread per core, that every compress and decode
shares unless told otherwise (`Threads`); work started on its own threads runs inline there."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait

# Threads: an explicit count (a pool for that call), an executor, or None for the process-wide pool.
Threads = int | Executor | None

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_worker = threading.local()  # `busy` on the codec's own threads: nested work runs inline there


def _mark_worker() -> None:
    _worker.busy = True


def _forget_pool() -> None:
    """In a forked child: the parent's threads are not there, so a new pool is started on demand."""
    global _pool
    _pool = None


def cores() -> int:
    """The cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def decode_pool() -> Executor:
    """The process-wide codec pool, one thread per core, started on first use.

    Every decode and compress without an explicit `threads` shares it, so chunks of several files
    (a reader's hooks, the next file decoding while another is fetched) queue on the same cores
    instead of each call starting threads of its own. Submit whole-file decodes to it freely:
    codec work started on its threads runs inline there instead of waiting on the pool.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            if not hasattr(_forget_pool, "registered"):
                os.register_at_fork(after_in_child=_forget_pool)
                _forget_pool.registered = True  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(cores(), thread_name_prefix="activault-codec", initializer=_mark_worker)
        return _pool


def map_range(fn: Callable[[int], object], n: int, threads: Threads) -> list[object]:
    """fn(0..n-1) on `threads` (see `Threads`); returns only once no call is left running.

    The first error (in index order) is re-raised after the others finished or were cancelled:
    a caller's buffer is never written to after this returns, even on an error.
    """
    if n <= 1 or threads == 1 or getattr(_worker, "busy", False):
        return [fn(i) for i in range(n)]
    if isinstance(threads, int):
        with ThreadPoolExecutor(min(n, threads), "activault-codec", initializer=_mark_worker) as own:
            return map_range(fn, n, own)
    pool = decode_pool() if threads is None else threads
    futures: list[Future[object]] = [pool.submit(fn, i) for i in range(n)]
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    if pending and any(f.exception() is not None for f in done):
        for f in pending:
            f.cancel()
        wait(pending)
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
    return [f.result() for f in futures]
