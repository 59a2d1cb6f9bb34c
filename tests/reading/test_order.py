"""Which file comes next, and which request goes first: the decisions alone, without I/O."""

from __future__ import annotations

import itertools

import pytest

from activault.reading.order import (
    BODY,
    HEAD,
    file_order,
    file_priority,
    mix_seed,
    next_file_starts,
    position_after,
    range_priority,
    read_ahead,
    request_priority,
)

BLOCKS = [list(range(8)), list(range(8, 12))]  # two listings: the second appended by sync()


def test_seeds_are_stable_across_processes_and_tell_their_parts_apart() -> None:
    # Pinned: a change here reorders every stored run's files and resumed loaders' windows.
    assert mix_seed(4, 0, 0) == 544374246341540571
    assert mix_seed(0, 1, "window", 2) == 3204879237184321752
    assert mix_seed(1, "2") != mix_seed("1", 2)  # the same text, different parts


def test_the_stored_order_is_kept_unless_shuffled() -> None:
    assert file_order(BLOCKS, 3, seed=1, shuffle=False) == list(range(12))


def test_each_epoch_and_seed_is_a_permutation_within_each_block() -> None:
    # Pinned: the order readers have always read these blocks in (seed 4, epochs 0 and 1).
    assert file_order(BLOCKS, 0, seed=4, shuffle=True) == [3, 5, 6, 4, 0, 7, 1, 2, 11, 8, 9, 10]
    assert file_order(BLOCKS, 1, seed=4, shuffle=True) == [0, 4, 5, 6, 3, 2, 7, 1, 10, 8, 11, 9]
    orders = {}
    for epoch, seed in itertools.product(range(4), range(4)):
        got = file_order(BLOCKS, epoch, seed=seed, shuffle=True)
        assert sorted(got[:8]) == BLOCKS[0] and sorted(got[8:]) == BLOCKS[1]  # blocks never mix
        assert got == file_order(BLOCKS, epoch, seed=seed, shuffle=True)  # deterministic
        orders[epoch, seed] = tuple(got)
    assert len(set(orders.values())) == len(orders)  # every epoch and seed its own order


def test_a_new_listing_never_reorders_the_files_before_it() -> None:
    for world_size in (1, 3):
        before = file_order(BLOCKS[:1], 2, seed=7, shuffle=True, rank=1, world_size=world_size)
        after = file_order(BLOCKS, 2, seed=7, shuffle=True, rank=1, world_size=world_size)
        assert after[: len(before)] == before


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 12, 13])
def test_rank_shards_are_disjoint_and_cover_every_file(world_size: int) -> None:
    whole = file_order(BLOCKS, 1, seed=2, shuffle=True)
    shards = [file_order(BLOCKS, 1, seed=2, shuffle=True, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(itertools.chain(*shards)) == list(range(12))  # disjoint and covering
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert all(s == whole[r::world_size] for r, s in enumerate(shards))  # every world_size-th of one order


def test_read_ahead_keeps_buffer_size_files_in_flight_to_the_end() -> None:
    assert read_ahead(0, 0, 10, 3) == range(0, 3)  # a fresh stream starts buffer_size files
    assert read_ahead(3, 2, 10, 3) == range(3, 4)  # one was consumed: one more starts
    assert read_ahead(3, 3, 10, 3) == range(3, 3)  # full: none
    assert read_ahead(9, 0, 10, 3) == range(9, 10)  # the end: only what is left
    assert read_ahead(10, 1, 10, 3) == range(10, 10)
    assert read_ahead(6, 0, 10, 2) == range(6, 8)  # a resumed stream starts at its index


def test_headers_are_requested_before_any_body_range_and_earlier_files_first() -> None:
    jobs = [
        range_priority(request_priority(BODY, 0, 1), 4096),
        range_priority(request_priority(BODY, 0, 0), 8192),
        request_priority(HEAD, 2, 0),
        range_priority(request_priority(BODY, 0, 0), 4096),
        range_priority(request_priority(HEAD, 1, 0), 4096),  # the rest of a file requested whole
        request_priority(HEAD, 1, 1),
        range_priority(request_priority(BODY, 1, 0), 4096),
    ]
    assert sorted(jobs) == [
        (HEAD, 1, 0, 4096),
        (HEAD, 1, 1),
        (HEAD, 2, 0),
        (BODY, 0, 0, 4096),
        (BODY, 0, 0, 8192),  # a file's ranges front to back
        (BODY, 0, 1, 4096),  # then the next hook's
        (BODY, 1, 0, 4096),  # then the next file's
    ]
    assert sorted([file_priority(5), file_priority(2), file_priority(11)]) == [(2,), (5,), (11,)]


@pytest.mark.parametrize(
    ("first", "mapped", "one_request_each", "when"),
    [
        (True, True, False, "read"),  # the first file is read alone
        (True, True, True, "read"),
        (False, True, False, "now"),  # mapped: no requests to queue behind
        (False, True, True, "now"),
        (True, False, False, "read"),
        (True, False, True, "queued"),  # one GET per hook: alone would idle the other workers
        (False, False, False, "queued"),
        (False, False, True, "queued"),
    ],
)
def test_when_the_next_file_may_start(first: bool, mapped: bool, one_request_each: bool, when: str) -> None:
    assert next_file_starts(first, mapped, one_request_each) == when


def test_resuming_starts_at_the_saved_window_and_token() -> None:
    assert position_after(3, 5, 10) == (3, 5)  # mid-window: the same window, the next token
    assert position_after(3, 10, 10) == (4, 0)  # its last token: the next window's first
