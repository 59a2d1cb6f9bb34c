"""tools/hook_names.py: `activault hooks MODEL` lists exactly the hooks a collection can store, each with the
width the capture itself sees, on the tiny models of every architecture and on the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from activault.cli import main
from activault.collection.hooks import example_names, hook_dims, resolve_hooks
from activault.collection.model import load_skeleton, shipped_config
from activault.config import TransformerConfig
from activault.errors import ConfigError
from activault.tools.hook_names import model_hooks, shipped_models
from activault.tools.tiny import ARCHITECTURES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_listed_hook_resolves_to_its_module_and_captures_its_width(tiny_model_dir, arch) -> None:
    path = str(tiny_model_dir(arch))
    found = model_hooks(path, dtype="float32")
    skeleton = load_skeleton(
        TransformerConfig(model_name=path, dtype="float32", device="cpu", attn_implementation="eager")
    )
    names = [r.name for r in found.hooks]
    specs = resolve_hooks(skeleton, names)
    assert [(s.module, s.kind, s.block) for s in specs] == [(r.module, r.kind, r.block) for r in found.hooks]
    # Capture (the collection's own hooks, another batch shape) sees the listed width for every hook.
    assert hook_dims(skeleton, specs) == {r.name: r.width for r in found.hooks}
    assert all(r.bytes_per_token == 4 * r.width for r in found.hooks) and found.dtype == "float32"
    assert set(example_names(skeleton)) <= set(names), "every name an error message suggests is listed"
    assert found.blocks == 4 and {r.block for r in found.hooks} == {None, 0, 1, 2, 3}
    blocks_path = specs[0].module.rsplit(".", 1)[0]
    assert f"{blocks_path}.pre" not in names, "a ModuleList is never called: no hook of it fires"
    d = skeleton.get_input_embeddings().weight.shape[1]
    ours = {r.name: r.width for r in found.hooks if r.name.startswith("models.layers.3.")}
    assert ours["models.layers.3.pre"] == ours["models.layers.3.post"] == d


def test_the_table_shows_each_hook_once_for_every_block_and_json_every_hook(tiny_model_dir, capsys) -> None:
    path = str(tiny_model_dir("llama"))
    assert main(["hooks", path, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{path}: LlamaForCausalLM, 4 blocks (i = 0..3, or -4..-1 from the end), stored as float32"
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln and not ln.startswith("models.layers.{i}.pre|post")}
    assert rows["models.layers.{i}.post"] == ["models.layers.{i}.post", "64", "256", "output", "of", "model.layers.{i}"]
    assert rows["model.layers.{i}.mlp.down_proj.pre"][1:3] == ["128", "512"]
    assert rows["lm_head.post"][1:3] == ["512", "2,048"] and "model.layers.0.post" not in rows
    assert main(["hooks", path, "--json", "--dtype", "bfloat16"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == model_hooks(path, "bfloat16").to_dict() and listed["dtype"] == "bfloat16"
    per_block = [sum(1 for h in listed["hooks"] if h["block"] == i) for i in range(4)]
    assert len(set(per_block)) == 1 and len(rows) == per_block[0] + sum(h["block"] is None for h in listed["hooks"])
    assert {"name": "models.layers.2.mlp.post", "module": "model.layers.2.mlp", "kind": "post", "block": 2,
            "width": 64, "bytes_per_token": 128} in listed["hooks"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("model", shipped_models())
def test_the_shipped_configs_list_their_hooks_offline(model, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = model_hooks(model)
    config = shipped_config(model)
    assert config is not None
    text = config.get("text_config", config)
    d, n = text["hidden_size"], text["num_hidden_layers"]
    widths = {r.name: r for r in found.hooks}
    assert found.blocks == n and found.dtype == "bfloat16"
    for name in (f"models.layers.{n - 1}.post", "models.layers.0.pre", f"models.layers.{n // 2}.mlp.post"):
        assert (widths[name].width, widths[name].bytes_per_token) == (d, 2 * d)
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg["transformer_config"]["model_name"] == model:
            assert set(cfg["upload_config"]["hooks"]) <= set(widths), path.name


def test_a_model_that_cannot_be_found_names_the_ways_to_give_one(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["hooks", "no-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "model 'no-org/no-such-model' is no local folder and none of the shipped configs" in err
    assert "HuggingFaceTB/SmolLM2-135M" in err and "a folder holding the model's config.json" in err
    with pytest.raises(ConfigError, match="--dtype 'fp7' is unknown: use float32, float16, bfloat16 or auto"):
        model_hooks("HuggingFaceTB/SmolLM2-135M", dtype="fp7")
