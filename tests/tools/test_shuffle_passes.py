"""tools/shuffle_passes.py: files read into reused buffers, the reused buffers' gathers, and
documents carried as one stream over the source's machines."""

from __future__ import annotations

import numpy as np
import torch

from activault.storage import Store
from activault.tools.shuffle import listed_sizes
from activault.tools.shuffle_passes import Buffers, Tokens, global_documents, read_file
from support.synth import write_synthetic_run


def test_gathers_fill_reused_buffers_and_documents_become_one_stream() -> None:
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
    # Machine 1 of 3: ordinal 4 -> 4 * 3 + 1; padding stays -1; every (machine, ordinal) distinct.
    assert global_documents(torch.tensor([4, 0, -1]), 1, 3).tolist() == [13, 1, -1]
    seen = {int(global_documents(torch.tensor([d]), m, 3)) for m in range(3) for d in range(5)}
    assert seen == set(range(15))


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
