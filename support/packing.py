"""Small data configs and JSONL corpora for the packing and source tests."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from activault.config import DataConfig

CORPUS = str(resources.files("activault").joinpath("demo_corpus.jsonl"))


def cfg(data_key: str = CORPUS, **kw) -> DataConfig:
    base = dict(data_key=data_key, n_batches=1, seq_length=48, batch_size=4, seed=0, shuffle_buffer=0)
    return DataConfig(**{**base, **kw})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus_rows() -> list[dict]:
    return [json.loads(line) for line in Path(CORPUS).read_text().splitlines()]
