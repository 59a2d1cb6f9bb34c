"""Which file a reader reads next, and which of its requests go first: small pure functions.

FileStream (stream.py) and Prefetch (prefetch.py) ask these, then read the bytes (fetch.py); TokenLoader resumes
at `position_after` (its windows: window.py). Nothing here does I/O: tests/reading/test_order.py
checks each decision alone.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Literal, TypeVar

T = TypeVar("T")

# Priority classes of the range workers' jobs: every queued header request before any body range.
HEAD, BODY = 0, 1

# When the file after this one may queue its first requests (`next_file_starts`).
NextStart = Literal["now", "queued", "read"]


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (Python's hash() of a str is salted per process)."""
    text = ":".join(map(str, parts)).encode()
    return zlib.crc32(text) | (zlib.adler32(repr(parts).encode()) << 32)


def file_order(
    blocks: Sequence[Sequence[T]], epoch: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1
) -> list[T]:
    """This rank's files in reading order for `epoch`.

    Each block (one listing; `sync()` appends a block, never reorders one) keeps its stored order,
    or with `shuffle` is permuted by (seed, epoch, block index); blocks follow each other, and rank
    `rank` takes every `world_size`-th file from its own index: the ranks' shares are disjoint and
    together cover every file.
    """
    out: list[T] = []
    for b, block in enumerate(blocks):
        files = list(block)
        if shuffle:
            random.Random(mix_seed(seed, epoch, b)).shuffle(files)
        out += files
    return out[rank::world_size]


def read_ahead(next_index: int, in_flight: int, files: int, buffer_size: int) -> range:
    """Indices of the files to start now: the next ones, until `buffer_size` are in flight."""
    room = min(buffer_size - in_flight, files - next_index)
    return range(next_index, next_index + max(room, 0))


def file_priority(index: int) -> tuple[int]:
    """The file workers' order: earlier files of the epoch first."""
    return (index,)


def request_priority(phase: int, seq: int, hook: int) -> tuple[int, int, int]:
    """The range workers' order for file `seq`'s requests of one hook: headers (HEAD) before any
    body range (BODY), then earlier files first, then hooks in order. A range appends its first
    byte (`range_priority`): a file's ranges go front to back."""
    return (phase, seq, hook)


def range_priority(request: tuple[int, ...], start: int) -> tuple[int, ...]:
    """The priority of the range from byte `start` of the file `request` names."""
    return (*request, start)


def next_file_starts(first: bool, mapped: bool, one_request_each: bool) -> NextStart:
    """When the next file may queue its first requests ("now", once this file's first requests
    are "queued", or once it is "read"), so a later file's first range queues behind an earlier
    file's ranges instead of running beside them.

    Args:
        first: this is the stream's first file: it is read alone, so the first item waits for one
            file, not for a share of two (after it, two files read at once move more from disk
            than one at a time).
        mapped: every hook's file is mapped and read in place on its loading thread (no requests),
            so the next one reads beside it at once, unless this is the first file.
        one_request_each: every hook's file is one request. A first file like that is not read
            alone: it would leave the other range workers idle, and where each connection has its
            own limit (real endpoints) reading it alone only delays the next by a whole file
            (docs/benchmarks.md: Reading).
    """
    if mapped:
        return "read" if first else "now"
    return "read" if first and not one_request_each else "queued"


def position_after(window: int, taken: int, tokens: int) -> tuple[int, int]:
    """(window, offset) of the next token once `taken` of a window's `tokens` are used: what a
    TokenLoader's state_dict() resumes from."""
    return (window, taken) if taken < tokens else (window + 1, 0)
