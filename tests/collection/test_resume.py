"""collection/resume.py: every config field is classified as shaping the data or runtime only; resuming
with a changed data field (or another checkpoint) is refused naming each field with both values, and a
runtime change, an older cfg.json without a newer field, or an empty record is not."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import BaseModel

from activault.collection.resume import (
    FIELDS,
    MODEL_FACTS,
    changed_fields,
    check_resume,
    config_fields,
    hook_metadata,
    run_record,
)
from activault.config import Config, parse_config
from activault.errors import ConfigError
from activault.vault.records import RunRecord

BASE = {
    "run_name": "run",
    "transformer_config": {"model_name": "/models/tiny", "dtype": "float32"},
    "data_config": {"data_key": "corpus.jsonl", "n_batches": 6, "seq_length": 64, "batch_size": 4},
    "upload_config": {"batches_per_upload": 2, "hooks": ["models.layers.1.post", "models.layers.0.mlp.post"]},
}
MODEL = {"architecture": "LlamaForCausalLM", "model_type": "llama", "d_model": 64, "n_layers": 4, "vocab_size": 512}

# A valid other value for every field: a new config field must be added here, and classified in resume.py.
OTHER: dict[str, Any] = {
    "run_name": "other-run",
    "num_runs": 2,
    "storage": "s3://bucket/elsewhere",
    "transformer_config.model_name": "/models/other",
    "transformer_config.dtype": "bfloat16",
    "transformer_config.cache_dir": "/cache",
    "transformer_config.kwargs": {"revision": "v2"},
    "transformer_config.max_per_device_memory": "40GiB",
    "transformer_config.attn_implementation": "eager",
    "transformer_config.device": "cpu",
    "data_config.data_key": "other.jsonl",
    "data_config.registry": "/my/registry.json",
    "data_config.text_field": "body",
    "data_config.messages_field": "dialog",
    "data_config.n_batches": 8,
    "data_config.seq_length": 32,
    "data_config.batch_size": 2,
    "data_config.bucket_name": "bucket",
    "data_config.seed": 7,
    "data_config.skip_cache": True,
    "data_config.start_batch": 1,
    "data_config.clean_added_tokens": True,
    "data_config.clean_default_system_prompt": True,
    "data_config.shuffle_buffer": 16,
    "data_config.align_to": "./vault/base",
    "data_config.on_bad_record": "error",
    "upload_config.batches_per_upload": 3,
    "upload_config.hooks": ["models.layers.1.post"],
    "upload_config.max_pending": 5,
    "upload_config.write_threads": 1,
    "upload_config.price_per_gb_month": 0.1,
    "upload_config.lease_seconds": 30,
    "upload_config.compression": "fp8",
    "upload_config.compression_level": 5,
    "upload_config.compression_chunk_kib": 64,
    "upload_config.on_nonfinite": "error",
}


def leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf field of the config tree, walked here (not with resume.config_fields)."""
    out = set()
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out |= leaf_paths(sub, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def record(
    config: dict[str, Any] | None = None, model: dict[str, Any] | None = None, tokenizer: str | None = None
) -> RunRecord:
    """cfg.json of a run collected with `config`, as collect builds it."""
    cfg = parse_config(copy.deepcopy(config or BASE))
    tok = tokenizer or cfg.transformer_config.model_name
    dims = {h: 64 for h in cfg.upload_config.hooks}
    return run_record(cfg, dict(model or MODEL), tok, dims, "0.test")


def with_value(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    node = raw
    *sections, leaf = path.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value
    return raw


def get(tree: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def test_every_config_field_is_classified_and_nothing_else():
    assert set(FIELDS) == leaf_paths(Config), "classify the new field in collection/resume.py"
    assert set(FIELDS.values()) == {"data", "runtime"}
    assert sorted(config_fields()) == sorted(leaf_paths(Config))
    assert set(OTHER) == set(FIELDS), "give the new field another value in OTHER"


@pytest.mark.parametrize("path", sorted(p for p, k in FIELDS.items() if k == "data"))
def test_a_changed_data_field_is_refused_naming_both_values(path):
    stored = record()
    new = record(with_value(path, OTHER[path]))
    old_value, new_value = get(stored.config, path), get(new.config, path)
    assert old_value != new_value
    assert changed_fields(stored, new) == [(path, old_value, new_value)]
    with pytest.raises(ConfigError) as e:
        check_resume(stored, new, "/vault/run/cfg.json")
    msg = str(e.value)
    assert f"  {path}: stored {old_value!r}, this config {new_value!r}" in msg.splitlines()
    assert f"run {new.run_name!r} at /vault/run/cfg.json" in msg
    assert "restore the stored value(s)" in msg and "new run_name" in msg


@pytest.mark.parametrize("path", sorted(p for p, k in FIELDS.items() if k == "runtime"))
def test_a_changed_runtime_field_is_allowed(path):
    stored, new = record(), record(with_value(path, OTHER[path]))
    assert get(stored.config, path) != get(new.config, path)
    assert changed_fields(stored, new) == []
    check_resume(stored, new, "/vault/run/cfg.json")


def test_every_changed_data_field_is_named_at_once():
    data = [p for p, k in FIELDS.items() if k == "data"]
    changed = copy.deepcopy(BASE)
    for path in data:
        node = changed
        *sections, leaf = path.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = OTHER[path]
    assert [d[0] for d in changed_fields(record(), record(changed))] == data
    with pytest.raises(ConfigError) as e:
        check_resume(record(), record(changed), "here")
    assert all(f"  {p}: stored " in str(e.value) for p in data)


@pytest.mark.parametrize("fact", MODEL_FACTS)
def test_another_checkpoint_at_the_same_path_is_refused(fact):
    other = {**MODEL, fact: "something else"}
    diffs = changed_fields(record(), record(model=other))
    assert diffs == [(f"model.{fact} (read from the checkpoint)", MODEL[fact], "something else")]
    with pytest.raises(ConfigError, match=rf"model\.{fact} \(read from the checkpoint\): stored"):
        check_resume(record(), record(model=other), "here")


def test_model_facts_an_older_record_lacks_are_not_compared():
    old = record(model={"architecture": "LlamaForCausalLM"})
    assert changed_fields(old, record(model={**MODEL, "d_model": 128})) == []
    diffs = changed_fields(old, record(model={**MODEL, "architecture": "GPT2LMHeadModel"}))
    assert diffs == [("model.architecture (read from the checkpoint)", "LlamaForCausalLM", "GPT2LMHeadModel")]


def test_another_tokenizer_for_the_same_model_name_is_refused():
    diffs = changed_fields(record(tokenizer="/a/models/tiny"), record(tokenizer="/b/models/tiny"))
    assert [(old, new) for _, old, new in diffs] == [("/a/models/tiny", "/b/models/tiny")]
    assert diffs[0][0].startswith("tokenizer")
    with pytest.raises(ConfigError, match="tokenizer .*stored '/a/models/tiny', this config '/b/models/tiny'"):
        check_resume(record(tokenizer="/a/models/tiny"), record(tokenizer="/b/models/tiny"), "here")


def test_one_model_folder_named_by_two_paths_is_the_same_model():
    """`vault-demo/model` from its folder, the absolute path from elsewhere: one resolved folder."""
    rel = record(with_value("transformer_config.model_name", "vault-demo/model"), tokenizer="/w/vault-demo/model")
    ab = record(with_value("transformer_config.model_name", "/w/vault-demo/model"), tokenizer="/w/vault-demo/model")
    assert changed_fields(rel, ab) == []
    other = record(with_value("transformer_config.model_name", "/x/vault-demo/model"), tokenizer="/x/vault-demo/model")
    assert [p for p, _, _ in changed_fields(rel, other)] == ["transformer_config.model_name"]


def test_a_field_missing_from_an_older_record_means_its_default():
    stored = record()
    del stored.config["upload_config"]["compression"]  # written before the field existed: "none"
    del stored.config["data_config"]["shuffle_buffer"]  # default 0
    assert changed_fields(stored, record()) == []
    diffs = changed_fields(stored, record(with_value("upload_config.compression", "fp8")))
    assert diffs == [("upload_config.compression", "none", "fp8")]
    diffs = changed_fields(stored, record(with_value("data_config.shuffle_buffer", 8)))
    assert diffs == [("data_config.shuffle_buffer", 0, 8)]


def test_a_record_without_a_config_is_compared_on_its_own_fields():
    """cfg.json of an import (or an older version) holds no config: its num_runs and hooks still count."""
    stored = record().model_copy(update={"config": {}})
    assert changed_fields(stored, record()) == []
    diffs = changed_fields(stored, record(with_value("upload_config.hooks", ["models.layers.1.post"])))
    assert diffs == [
        ("upload_config.hooks", ["models.layers.1.post", "models.layers.0.mlp.post"], ["models.layers.1.post"])
    ]


def test_no_stored_record_refuses_nothing():
    check_resume(None, record(), "here")


def test_a_stored_section_that_is_not_a_mapping_is_read_as_its_defaults():
    stored = record()
    stored.config["upload_config"] = ["not", "a", "mapping"]
    # Required fields have no default to compare with; optional ones are compared as their defaults.
    diffs = changed_fields(stored, record(with_value("upload_config.compression", "zstd")))
    assert diffs == [("upload_config.compression", "none", "zstd")]


def test_run_record_holds_the_config_and_what_was_loaded():
    cfg = parse_config(copy.deepcopy(BASE))
    rec = run_record(cfg, MODEL, "/models/tiny", {"models.layers.1.post": 64, "models.layers.0.mlp.post": 64}, "1.2")
    assert rec.config == cfg.to_public_dict() and parse_config(rec.config) == cfg
    assert (rec.run_name, rec.num_runs, rec.hooks) == ("run", 1, cfg.upload_config.hooks)
    assert (rec.model, rec.tokenizer, rec.activault_version) == (MODEL, "/models/tiny", "1.2")


def test_metadata_lists_every_tensor_collection_writes_so_one_request_fetches_a_file():
    """documents and norms included: a reader sizes its one ranged GET of a file from metadata.json."""
    import torch

    from activault.vault.megabatch import encode
    from activault.vault.records import header_metadata

    cfg = parse_config(copy.deepcopy(BASE))
    meta = hook_metadata(cfg, {h: 64 for h in cfg.upload_config.hooks}, torch.bfloat16, None)
    m = meta["models.layers.1.post"]
    assert set(m.tensors) == {"states", "input_ids", "positions", "documents", "norms"}
    rows, seq = m.rows_per_file, m.seq_length
    ids = torch.zeros(rows, seq, dtype=torch.int32)
    tensors = {"states": torch.ones(rows, seq, 64, dtype=torch.bfloat16), "input_ids": ids, "positions": ids}
    header, *data = encode(
        {**tensors, "documents": ids.to(torch.int64)}, header_metadata("run", m.hook, 0, 0, "m", True)
    )
    assert m.bytes_per_file == sum(b.nbytes for b in data)
