"""collection/datasize.py: a bound on a source's tokens before reading it (local files' bytes, a
cached Hub dataset_info.json), or why none is known."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from activault.collection.datasize import data_size
from activault.collection.packing import encode_document
from activault.collection.sources import DataSource, iter_documents, resolve_source
from support.packing import CORPUS


def test_local_json_and_text_files_are_bounded_by_their_bytes_and_the_bound_holds(tmp_path, tok):
    text = tmp_path / "t.txt"
    text.write_text("alpha beta\n\ngamma delta epsilon\n")
    for key in (CORPUS, str(text)):
        spec = resolve_source(key)
        size = data_size(spec)
        files = spec.data_files or ()
        assert size.tokens == sum(Path(f).stat().st_size for f in files) and "local file" in size.basis
        tokens = sum(
            len(encode_document(d, tok, clean_added_tokens=False, clean_default_system_prompt=False)[0])
            for d in iter_documents(spec)
        )
        assert 0 < tokens <= size.tokens


def test_parquet_and_uncached_hub_datasets_are_unknown_with_why(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a b c"] * 10}), tmp_path / "d.parquet")
    size = data_size(resolve_source(str(tmp_path / "d.parquet")))
    assert size.tokens is None and "compressed" in size.basis
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    size = data_size(DataSource(path="org/corpus", kind="text"))
    assert size.tokens is None and "'org/corpus' is not known on this machine" in size.basis


def test_a_cached_hub_dataset_is_bounded_by_its_splits_num_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    info = tmp_path / "org___corpus/sub/1.0.0/abc123/dataset_info.json"
    info.parent.mkdir(parents=True)
    splits = {"train": {"name": "train", "num_bytes": 123456, "num_examples": 10}, "test": {"num_bytes": 9}}
    info.write_text(json.dumps({"splits": splits}))
    size = data_size(DataSource(path="org/corpus", name="sub", kind="text"))
    assert size.tokens == 123456 and "split 'train'" in size.basis
    assert data_size(DataSource(path="org/corpus", name="other", kind="text")).tokens is None
    assert data_size(DataSource(path="org/corpus", name="sub", kind="text", split="test")).tokens == 9
