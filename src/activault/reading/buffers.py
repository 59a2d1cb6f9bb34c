"""The readers' byte buffers: recycled per stream, faulted in ahead of the reads, kept warm process-wide.

A fresh buffer costs a page fault per page on first touch: 4 x 256 MiB took ~2.3 s of CPU on this
project's VM, more than reading the bytes into it. So a stream hands the same buffers out again
(`ReadBuffers`), faults the next one in on a background thread while the current file is read
(`PREFAULT_BYTES`), and a dropped stream leaves its free buffers to the next one in the process
(`SPARE_BYTES`). Big buffers are anonymous mappings of small pages (`_anonymous`), not numpy's
allocations, which ask for transparent huge pages: on a VM that hands freed memory back to its
host (free page reporting) a huge page cost 1.2-2.4 ms per MiB to fault in against 0.4 for small
pages, and the reads and gathers into either ran alike once touched (docs/benchmarks.md, "First touch").
"""

from __future__ import annotations

import _thread
import mmap
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Buffers this big or bigger are faulted in ahead of their use: below it a fault costs less than
# the thread that would take it (a 16 MiB buffer faults in ~2 ms, a 256 MiB one 30-360 ms here).
PREFAULT_BYTES = 16 << 20
# Freed buffers kept warm for the next stream of this process, at most this many bytes in all
# (a second RCache or TokenLoader over the same run reuses them instead of faulting new memory).
SPARE_BYTES = 1 << 30
PAGE = 4096

_spare: list[np.ndarray] = []  # warm, unused; at most SPARE_BYTES together
_spare_lock = threading.Lock()


def _take_spare(nbytes: int) -> np.ndarray | None:
    """A spare buffer of nbytes to 2 x nbytes (the smallest), or None."""
    with _spare_lock:
        fits = [i for i, m in enumerate(_spare) if nbytes <= m.nbytes <= 2 * nbytes]
        if not fits:
            return None
        return _spare.pop(min(fits, key=lambda i: _spare[i].nbytes))  # by index: ndarray == compares contents


def _give_spare(mems: list[np.ndarray]) -> None:
    """Keep these unused buffers for the next stream, dropping the oldest beyond SPARE_BYTES."""
    with _spare_lock:
        _spare.extend(mems)
        while sum(m.nbytes for m in _spare) > SPARE_BYTES:
            _spare.pop(0)


def spare_bytes() -> int:
    """Bytes of warm buffers kept for the next stream of this process."""
    with _spare_lock:
        return sum(m.nbytes for m in _spare)


def _anonymous(nbytes: int) -> np.ndarray:
    """`nbytes` of private anonymous memory in small pages (see the module's docstring), unmapped
    once the array and every view of it are gone."""
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)


def _faulted(nbytes: int) -> np.ndarray:
    mem = _anonymous(nbytes)
    # One write per page, by numpy without the GIL. Not MAP_POPULATE: it holds the memory map's
    # lock for the whole buffer (~20 ms for 64 MiB here), and every page fault of the process
    # queued behind an mmap waiting for it (the consumer's first batch 20-30 ms later).
    mem[::PAGE] = 0
    return mem


@dataclass(eq=False)  # slots are compared by identity (list.remove), never by their arrays
class _Slot:
    mem: np.ndarray
    given: weakref.ref[np.ndarray] | None = None  # the array handed out; dead = free
    copied: Any = None  # a CUDA event recorded after non_blocking copies from this memory

    def free(self) -> bool:
        return self.given is None or self.given() is None


def _retire(slots: list[_Slot], pin: bool) -> None:
    """A dropped stream's free buffers go to the next one (pinned ones stay with torch's cache)."""
    if not pin:
        _give_spare([s.mem for s in slots if s.free() and s.copied is None])


class ReadBuffers:
    """Byte buffers handed out as tensors and handed out again once nothing uses them.

    A tensor made from a numpy array keeps that array alive, so once the weak reference to the
    array given out is dead, no tensor (or view of one) uses the memory any more. A new buffer
    of PREFAULT_BYTES or more is taken from the process's spare buffers where one fits, and
    starts one more of its size faulting in on a background thread, so the next request finds it
    warm; the buffers kept never exceed `keep` (the bound is keep x the largest request).
    Pinned buffers (for CUDA) are kept the same way, sized to the largest request (the caching
    host allocator rounds each allocation up to a power of two and never frees it); a buffer
    whose copy to the GPU may still be in flight is reused only after its recorded event.

    Args:
        pin: page-locked memory, for non_blocking copies to CUDA.
        keep: buffers kept for reuse at most.
        recycle: False allocates a new buffer for every request (bench/read.py's `-fresh` readers).
        ahead: buffers of one size the user holds at once at most (None: `keep`): no more of that
            size are faulted in ahead (TokenLoader's batches: 2, the one delivered and the next),
            so no pre-fault the user may never need takes the cores from its work.
    """

    def __init__(self, pin: bool = False, keep: int = 4, recycle: bool = True, ahead: int | None = None):
        self.pin, self.keep, self.recycle = pin, keep, recycle
        self.ahead = keep if ahead is None else ahead
        self._slots: list[_Slot] = []
        self._largest = 0
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when a pre-fault ends
        self._warming = 0  # bytes of the buffer being faulted in (0: none)
        weakref.finalize(self, _retire, self._slots, pin)

    def bytes(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes`, contents undefined."""
        if not self.recycle:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        with self._lock:
            free = [s for s in self._slots if s.mem.nbytes >= nbytes and s.free()]
            slot = min(free, key=lambda s: s.mem.nbytes, default=None)
            if slot is None:
                slot = _Slot(self._new(nbytes))
                if len(self._slots) >= self.keep:  # forget one: a free one, else the oldest (its user frees it)
                    unused = [s for s in self._slots if s.free()]
                    self._slots.remove(unused[0] if unused else self._slots[0])
                self._slots.append(slot)
            given = slot.mem[:nbytes]
            slot.given, copied, slot.copied = weakref.ref(given), slot.copied, None
            self._warm_next(nbytes)
        if copied is not None:
            copied.synchronize()  # the last copy out of this memory has finished
        return torch.from_numpy(given)

    def _new(self, nbytes: int) -> np.ndarray:
        self._largest = max(self._largest, nbytes)
        if self.pin:
            return torch.empty(self._largest, dtype=torch.uint8, pin_memory=True).numpy()
        if nbytes < PREFAULT_BYTES:
            return np.empty(nbytes, np.uint8)
        spare = _take_spare(nbytes)
        return spare if spare is not None else _anonymous(nbytes)

    def _warm_next(self, nbytes: int) -> None:
        """Fault one more buffer of `nbytes` in, off the caller's thread, unless one is free or
        `keep` are held (called with the lock held)."""
        if self.pin or nbytes < PREFAULT_BYTES or self._warming or len(self._slots) >= self.keep:
            return
        fits = [s for s in self._slots if s.mem.nbytes >= nbytes]
        if len(fits) >= self.ahead or any(s.free() for s in fits):
            return
        self._warming = nbytes
        # A bare thread: threading.Thread.start() waits until the new thread runs, a scheduler
        # slice on busy cores (13-63 ms for TokenLoader's second batch on this project's VM).
        _thread.start_new_thread(self._warm, (nbytes,))

    def _warm(self, nbytes: int) -> None:
        mem: np.ndarray | None = None
        try:
            mem = _take_spare(nbytes)
            mem = mem if mem is not None else _faulted(nbytes)
        finally:  # failed (out of memory): the request that needs it allocates, and fails, itself
            with self._lock:
                self._warming = 0
                self._settled.notify_all()
                if mem is not None and len(self._slots) < self.keep:
                    self._slots.append(_Slot(mem))
                    mem = None
        if mem is not None:
            _give_spare([mem])  # the stream needed none: the next one may

    def settle(self) -> None:
        """Wait for the pre-fault in flight, if any."""
        with self._settled:
            self._settled.wait_for(lambda: not self._warming)

    def prefaulted(self) -> int:
        """Buffers faulted in ahead of use and not handed out yet."""
        with self._lock:
            return sum(s.given is None for s in self._slots)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self.bytes(n * dtype.itemsize).view(dtype).view(shape)

    def copied(self, tensors: list[torch.Tensor], event: Any) -> None:
        """Non_blocking copies from these tensors were queued before `event`: reuse after it."""
        with self._lock:
            for t in tensors:
                ptr = t.data_ptr()
                for s in self._slots:
                    base = s.mem.ctypes.data
                    if base <= ptr < base + s.mem.nbytes:
                        s.copied = event
