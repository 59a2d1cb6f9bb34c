"""tools/shuffle_passes.py: documents carried as one stream over the source's machines (the passes
themselves run in tests/tools/test_shuffle.py)."""

from __future__ import annotations

import torch

from activault.tools.shuffle_passes import global_documents


def test_documents_become_one_stream_over_the_machines() -> None:
    # Machine 1 of 3: ordinal 4 -> 4 * 3 + 1; padding stays -1; every (machine, ordinal) distinct.
    assert global_documents(torch.tensor([4, 0, -1]), 1, 3).tolist() == [13, 1, -1]
    seen = {int(global_documents(torch.tensor([d]), m, 3)) for m in range(3) for d in range(5)}
    assert seen == set(range(15))
