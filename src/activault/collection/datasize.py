"""How much text a source holds, known before reading it: a bound on its tokens, or why none is.

It plans `n_batches: all` (collect until the data runs out). A token covers at least one byte of
text (byte-level BPE, SentencePiece byte fallback), and a record's JSON syntax outweighs the few
special tokens a tokenizer or chat template adds, so the bytes of local JSON or text files bound
the tokens they yield. A Hub dataset is bounded by its split's `num_bytes` (Arrow bytes of every
column) in a dataset_info.json that `datasets` cached on this machine, when there is one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from activault.collection.sources import DataSource, local_files
from activault.units import human_bytes


@dataclass(frozen=True)
class DataSize:
    """At most `tokens` tokens (None: unknown), and `basis`: how that is known, or why it is not."""

    tokens: int | None
    basis: str


def data_size(spec: DataSource) -> DataSize:
    """A bound on the tokens `spec` yields, from file sizes or cached dataset info (reads no data)."""
    if spec.path in ("json", "text", "parquet") and spec.data_files:
        files = [f for pattern in spec.data_files for f in local_files(pattern)]
        if not files:
            return DataSize(None, "its data_files are not files on this machine")
        if spec.path == "parquet":
            return DataSize(None, "parquet files are compressed, so their size bounds no token count")
        n = sum(os.path.getsize(f) for f in files)
        return DataSize(n, f"the {len(files)} local file(s) hold {human_bytes(n)} and a token covers >= 1 byte")
    found = _cached_split_bytes(spec)
    if found is None:
        return DataSize(
            None,
            f"the size of Hub dataset {spec.path!r} is not known on this machine (no dataset_info.json of "
            "it in the datasets cache)",
        )
    n, where = found
    return DataSize(n, f"split {spec.split!r} holds {human_bytes(n)} (num_bytes in {where})")


def datasets_cache() -> Path:
    """Where `datasets` caches datasets, as it decides (without importing it)."""
    if env := os.environ.get("HF_DATASETS_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "datasets"


def _cached_split_bytes(spec: DataSource) -> tuple[int, Path] | None:
    """The largest `num_bytes` of the split among cached dataset_info.json files of the dataset
    (datasets lays them out as {namespace}___{name}/{config}/{version}/{hash}/)."""
    folder = datasets_cache() / spec.path.replace("/", "___")
    best: tuple[int, Path] | None = None
    for info in folder.glob(f"{spec.name or '*'}/*/*/dataset_info.json"):
        try:
            split = json.loads(info.read_text())["splits"][spec.split]
            n = split["num_bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another split, or a file being written: no bound from it
        if isinstance(n, int) and n > 0 and (best is None or n > best[0]):
            best = (n, info)
    return best
