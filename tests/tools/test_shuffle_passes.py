"""tools/shuffle_passes.py: the plan of buckets (uniform, labels matching their counts), the
reused buffers' gathers, and documents carried as one stream over the source's machines."""

from __future__ import annotations

import numpy as np
import torch

from activault.tools.shuffle_passes import Tokens, bucket_counts, global_documents, labels


def test_buckets_are_uniform_and_labels_match_their_counts() -> None:
    counts = bucket_counts([4000, 4000, 3], 4, seed=5)
    assert counts.sum(1).tolist() == [4000, 4000, 3]
    for j in range(3):
        assert np.bincount(labels(counts[j], j, 5), minlength=4).tolist() == counts[j].tolist()
    assert np.abs(counts[:2] / 1000 - 1).max() < 0.15  # each bucket about a quarter of a file
    # A slot's bucket, over many seeds, is uniform: each bucket about a quarter of the time.
    first = [labels(bucket_counts([3], 4, s)[0], 0, s)[0] for s in range(2000)]
    assert np.abs(np.bincount(first, minlength=4) / 500 - 1).max() < 0.15


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
