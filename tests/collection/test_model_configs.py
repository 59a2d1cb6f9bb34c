"""The shipped model configurations (src/activault/model_configs/, the Hub's config.json of each
shipped config's model) build the real architectures on the meta device, and every hook of the
shipped configs/*.yaml resolves on them to the model's width."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from activault.collection.hooks import find_blocks, hook_dims, resolve_hooks

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))

# Parameter counts the Hub shows for each model (safetensors): an independent check of the numbers.
PUBLISHED = {
    "meta-llama/Llama-3.3-70B-Instruct": 70.6e9,
    "google/gemma-2-27b-it": 27.2e9,
    "mistralai/Mistral-Small-24B-Instruct-2501": 23.6e9,
    "Qwen/QwQ-32B": 32.8e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32.8e9,
    "CohereForAI/c4ai-command-a-03-2025": 111e9,
    "HuggingFaceTB/SmolLM2-135M": 135e6,
}


def shipped(repo_id: str) -> dict:
    """The shipped config.json of `repo_id` (model_configs/{org}--{name}.json)."""
    path = resources.files("activault").joinpath("model_configs", repo_id.replace("/", "--") + ".json")
    return json.loads(path.read_text())


def test_every_shipped_config_has_its_model_config() -> None:
    names = {yaml.safe_load(p.read_text())["transformer_config"]["model_name"] for p in YAMLS}
    assert len(YAMLS) == 7 and names == set(PUBLISHED)
    files = {p.name for p in resources.files("activault").joinpath("model_configs").iterdir()}
    assert files == {n.replace("/", "--") + ".json" for n in names}


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_model_builds_on_meta_and_the_hooks_resolve(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    repo_id = cfg["transformer_config"]["model_name"]
    d = shipped(repo_id)
    config = AutoConfig.for_model(**d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert type(model).__name__ == d["architectures"][0]

    _, blocks = find_blocks(model)
    assert len(blocks) == d["num_hidden_layers"]
    assert model.get_input_embeddings().weight.shape == (d["vocab_size"], d["hidden_size"])
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - PUBLISHED[repo_id]) / PUBLISHED[repo_id] < 0.005, n_params

    hooks = cfg["upload_config"]["hooks"]
    for name in hooks:
        layer = int(re.match(r"models\.layers\.(\d+)\.", name).group(1))  # type: ignore[union-attr]
        assert layer < d["num_hidden_layers"], name
    specs = resolve_hooks(model, hooks)
    assert hook_dims(model, specs) == dict.fromkeys(hooks, d["hidden_size"])


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_estimate_runs_offline_and_matches_a_hand_computation(path: Path, monkeypatch, capsys) -> None:
    from activault.cli import main
    from activault.collection.model import hub_offline
    from activault.units import human_bytes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_offline.cache_clear()
    cfg = yaml.safe_load(path.read_text())
    d = shipped(cfg["transformer_config"]["model_name"])["hidden_size"]
    data, hooks = cfg["data_config"], cfg["upload_config"]["hooks"]
    # Every shipped hook is a residual, attention or MLP input/output: d_model wide, bf16 (2 bytes),
    # plus an int32 token id, an int32 position and an int64 document ordinal per token.
    assert cfg["transformer_config"]["dtype"] == "bfloat16"
    tokens = data["n_batches"] * data["batch_size"] * data["seq_length"]
    want = tokens * len(hooks) * (d * 2 + 4 + 4 + 8)
    # Planned for a GPU node and S3: this machine's memory and disk are not what the preflight would check there.
    monkeypatch.setattr("activault.collection.preflight.available_memory", lambda: None)
    assert main(["estimate", "--config", str(path), "--storage", "s3://main"]) == 0
    out = capsys.readouterr().out
    assert f"total        {human_bytes(want)}" in out, out
    assert f"{tokens:,}" in out
