"""tools/shuffle_tokens.py: files read into reused buffers, and the reused buffers' gathers (also from
several parts read as one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activault.storage import Store
from activault.tools.shuffle import listed_sizes
from activault.tools.shuffle_tokens import Buffers, Segments, Tokens, read_file
from support.synth import write_synthetic_run


def test_gathers_fill_reused_buffers() -> None:
    src = Tokens(
        {"h": torch.arange(12.0).view(6, 2)},
        torch.arange(6, dtype=torch.int32),
        torch.tensor([0, 1, 0, 1, 2, -1], dtype=torch.int32),
        torch.tensor([3, 3, 4, 4, 4, -1]),
    )
    buf = Tokens.empty(src, 6)
    out = src.gather(np.array([4, 0, 5]), buf)
    assert out.n == 3 and out.ids.data_ptr() == buf.ids.data_ptr()  # no new allocation
    assert out.ids.tolist() == [4, 0, 5] and out.states["h"][0].tolist() == [8.0, 9.0]
    assert out.docs is not None and out.docs.tolist() == [4, 3, -1]
    # The gathers do not clip (np.take's mode="clip" skips numpy's buffered copy): a slot outside the
    # source fails instead of repeating the last one, and the negative index is not read from the end.
    for bad in ([0, 6], [-1, 2]):
        with pytest.raises(IndexError, match="outside 0..5"):
            src.gather(np.array(bad), buf)


def test_files_are_read_into_reused_buffers_in_turn(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    run = write_synthetic_run(store, "run", ["h1", "h2"], files=3, documents=True)
    sizes, into = listed_sizes(store, "run", run.hooks), Buffers(2)
    got = []
    for name in run.names:
        t = read_file(store, "run", run.hooks, name, True, True, sizes, into)
        want = read_file(store, "run", run.hooks, name, True)  # a fresh buffer per file
        assert t.docs is not None and want.docs is not None and torch.equal(t.docs, want.docs)
        assert torch.equal(t.ids, want.ids) and all(torch.equal(t.states[h], want.states[h]) for h in run.hooks)
        got.append(t.states["h1"].data_ptr())
    assert got[0] == got[2] != got[1]  # two buffers in turn: the third file read into the first's


def test_a_gather_from_parts_equals_the_gather_from_their_concatenation() -> None:
    g = torch.Generator().manual_seed(0)

    def part(n: int, base: int) -> Tokens:
        ids = torch.arange(base, base + n, dtype=torch.int32)
        states = {h: torch.randn(n, 5, generator=g).to(torch.bfloat16) for h in ("a", "b")}
        return Tokens(states, ids, ids % 7 - 1, ids.to(torch.int64) * 3)

    parts = [part(n, sum((9, 1, 14)[:i])) for i, n in enumerate((9, 1, 14))]
    whole = Tokens(
        {h: torch.cat([p.states[h] for p in parts]) for h in ("a", "b")},
        *(torch.cat([getattr(p, c) for p in parts]) for c in ("ids", "pos", "docs")),
    )
    seg = Segments(parts)
    assert seg.n == 24 and torch.equal(seg.pos, whole.pos) and seg.view(0, 24) is seg
    out, want = Tokens.empty(whole, 24), Tokens.empty(whole, 24)
    for index in (np.random.default_rng(1).permutation(24), np.array([23, 9, 0, 9, 10])):
        got = seg.gather(index, out)
        whole.gather(index, want)
        assert got.n == index.size and got.ids.data_ptr() == out.ids.data_ptr()  # into `out`
        for a, b in zip(got.columns(), want.view(0, index.size).columns(), strict=True):
            assert torch.equal(a, b)
