"""collection/model.py: loading the tokenizer and model (dtype, device, truncation after the last hooked
block), the weightless skeleton, shipped configs, model facts; every unloadable model_name is one
ConfigError naming the field and the fix."""

from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
from test_hooks import reference, tcfg
from torch import nn

from activault.collection.hooks import Capture, HookPoint, find_blocks, resolve_hooks
from activault.collection.model import (
    hub_offline,
    keep_layers,
    load_config,
    load_model,
    load_skeleton,
    load_tokenizer,
    model_info,
    runs_on_cpu,
    shipped_config,
    stored_dtype,
)
from activault.config import TransformerConfig, parse_config
from activault.errors import ConfigError

SHIPPED = sorted(p.name for p in resources.files("activault").joinpath("model_configs").iterdir())


def test_truncated_model_equals_full_model(tiny_model_dir):
    path = tiny_model_dir("llama")
    names = [
        "models.layers.1.post",
        "models.layers.0.mlp.pre",
        "model.layers.1.self_attn.o_proj.pre",
    ]
    specs = resolve_hooks(load_skeleton(tcfg(path)), names)
    small = load_model(tcfg(path), specs)
    assert len(find_blocks(small)[1]) == 2 and small.config.num_hidden_layers == 2
    assert isinstance(small.lm_head, nn.Identity)
    # Tied or not, the input embedding stays.
    assert small.get_input_embeddings().weight.shape[0] == 512
    info = model_info(small)
    assert (info["n_layers"], info["n_layers_kept"], info["d_model"]) == (4, 2, 64)
    full = reference(path, "llama")
    ids = torch.randint(5, 500, (2, 9))
    pos, seg = torch.arange(9).repeat(2, 1), torch.ones(2, 9, dtype=torch.int32)
    with Capture(small, specs) as a, Capture(full, specs) as b:
        got, want = a(ids, pos, seg), b(ids, pos, seg)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_config_errors_name_the_fix(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="model_name"):
        load_skeleton(tcfg(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="model_name"):
        load_tokenizer(tcfg(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="float8"):
        parse_config(
            {
                "run_name": "r",
                "transformer_config": {"model_name": "m", "dtype": "float8"},
                "data_config": {"data_key": "x", "n_batches": 1, "seq_length": 8, "batch_size": 1},
                "upload_config": {"batches_per_upload": 1, "hooks": ["models.layers.0.post"]},
            }
        )
    with pytest.raises(ConfigError, match="attn_implementation"):
        load_model(tcfg(tiny_model_dir("gemma2"), "sdpa"), [])  # Gemma2 has no SDPA in transformers
    assert len(load_tokenizer(tcfg(tiny_model_dir("llama")))) == 512


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_a_loaded_model_computes_what_transformers_computes(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = load_model(tcfg(path), [])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    full = reference(path, arch)
    assert type(model) is type(full), "an encoder loads as AutoModel, a decoder as a causal LM"
    ids = torch.randint(5, 500, (2, 11))
    with torch.no_grad():
        got = model(input_ids=ids, output_hidden_states=True).hidden_states
        want = full(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_the_model_loads_in_the_configured_dtype(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = load_model(TransformerConfig(model_name=str(path), dtype="bfloat16", device="cpu"), [])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model_info(model)["dtype"] == "bfloat16"


def test_auto_dtype_is_the_checkpoints(tiny_model_dir):
    path = tiny_model_dir("llama")
    saved = json.loads((path / "config.json").read_text())
    expected = getattr(torch, saved.get("dtype") or saved.get("torch_dtype") or "float32")
    auto = TransformerConfig(model_name=str(path), dtype="auto", device="cpu")
    assert stored_dtype(auto, load_config(auto)) == expected
    half = TransformerConfig(model_name=str(path), dtype="float16", device="cpu")
    assert stored_dtype(half, load_config(auto)) == torch.float16, "the configured one wins"
    for found, dtype in [
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (None, torch.float32),
        ("nonsense", torch.float32),
    ]:
        assert stored_dtype(auto, SimpleNamespace(torch_dtype=found)) == dtype, found


def test_the_skeleton_has_the_models_shapes_and_no_weights(tiny_model_dir):
    path = tiny_model_dir("llama")
    skeleton = load_skeleton(TransformerConfig(model_name=str(path), dtype="bfloat16", device="cpu"))
    real = reference(path, "llama")
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in skeleton.parameters())
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert not skeleton.training


def test_model_info_equals_the_saved_config(tiny_model_dir):
    for arch in ("llama", "gpt2", "bert"):
        path = tiny_model_dir(arch)
        saved = json.loads((path / "config.json").read_text())
        info = model_info(load_model(tcfg(path), []))
        assert info["d_model"] == saved.get("hidden_size", saved.get("n_embd"))
        assert info["n_layers"] == info["n_layers_kept"] == saved.get("num_hidden_layers", saved.get("n_layer"))
        assert info["vocab_size"] == saved["vocab_size"] and info["model_type"] == saved["model_type"]
        assert info["architecture"] == saved["architectures"][0] and info["name"] == str(path)
        assert info["causal"] is (arch != "bert") and info["dtype"] == "float32"
        assert info["attn_implementation"] == "eager"


@pytest.mark.parametrize(
    "blocks,n,keep",
    [([], 12, 12), ([0], 12, 1), ([3, 1], 12, 4), ([11], 12, 12), ([2, None], 12, 12), ([None], 12, 12)],
)
def test_keep_layers_is_one_past_the_last_hooked_block(blocks, n, keep):
    specs = [HookPoint(f"h{i}", "m", "post", b) for i, b in enumerate(blocks)]
    assert keep_layers(specs, n) == keep


def test_hooks_before_the_last_block_drop_the_rest_and_the_head(tiny_model_dir):
    path = tiny_model_dir("gpt2")
    specs = resolve_hooks(load_skeleton(tcfg(path)), ["models.layers.0.post"])
    model = load_model(tcfg(path), specs)
    assert len(find_blocks(model)[1]) == 1 and isinstance(model.lm_head, nn.Identity)
    assert (model_info(model)["n_layers"], model_info(model)["n_layers_kept"]) == (4, 1)
    full = reference(path, "gpt2")
    ids = torch.randint(5, 500, (1, 7))
    with Capture(model, specs) as a, Capture(full, specs) as b:
        got = a(ids, torch.arange(7)[None], torch.ones(1, 7, dtype=torch.int32))
        want = b(ids, torch.arange(7)[None], torch.ones(1, 7, dtype=torch.int32))
    torch.testing.assert_close(got["models.layers.0.post"], want["models.layers.0.post"], rtol=0, atol=0)


def test_a_hooked_head_is_kept(tiny_model_dir):
    path = tiny_model_dir("llama")
    specs = resolve_hooks(load_skeleton(tcfg(path)), ["lm_head.post"])
    model = load_model(tcfg(path), specs)
    assert isinstance(model.lm_head, nn.Linear) and len(find_blocks(model)[1]) == 4


@pytest.mark.parametrize(
    "device,cpu",
    [("cpu", True), ("cuda", False), ("cuda:1", False), ("mps", False), ("auto", not torch.cuda.is_available())],
)
def test_runs_on_cpu(device, cpu):
    assert runs_on_cpu(TransformerConfig(model_name="m", device=device)) is cpu


# ---------------------------------------------------------------- shipped configs and the Hub


@pytest.mark.parametrize("file", SHIPPED)
def test_each_shipped_config_is_returned_as_shipped(file):
    name = file.removesuffix(".json").replace("--", "/", 1)
    shipped = json.loads(resources.files("activault").joinpath("model_configs", file).read_text())
    assert shipped_config(name) == shipped and "model_type" in shipped


@pytest.mark.parametrize(
    "name",
    [
        "no/such-model",
        "HuggingFaceTB--SmolLM2-135M",  # the file's name, not a model's
        "SmolLM2-135M",
        "../model_configs/HuggingFaceTB--SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-135M/../x",
        "",
        "a\x00b/c",
    ],
)
def test_names_of_no_shipped_config_give_none(name):
    assert shipped_config(name) is None


def test_the_hub_is_off_limits_in_tests():
    assert hub_offline() is True  # HF_HUB_OFFLINE: nothing is ever fetched


def test_a_hub_mirror_is_probed_on_its_own_port(monkeypatch):
    """HF_ENDPOINT=http://127.0.0.1:PORT: a mirror listening there is reachable; closed, it is not."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        hub_offline.cache_clear()
        assert hub_offline() is False
        server.close()
        hub_offline.cache_clear()
        assert hub_offline() is True
    finally:
        server.close()
        hub_offline.cache_clear()


def test_a_shipped_model_has_a_config_without_the_hub():
    config = load_config(TransformerConfig(model_name="HuggingFaceTB/SmolLM2-135M", attn_implementation="eager"))
    shipped = shipped_config("HuggingFaceTB/SmolLM2-135M")
    assert shipped is not None and config.model_type == shipped["model_type"]
    assert config.num_hidden_layers == shipped["num_hidden_layers"] and config.hidden_size == shipped["hidden_size"]
    assert config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache and the Hub is unreachable"):
        load_tokenizer(TransformerConfig(model_name="HuggingFaceTB/SmolLM2-135M"))


# ---------------------------------------------------------------- garbage model folders


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"config.json": "{not json"},
        {"config.json": b"\xff\xfe\x00binary"},
        {"config.json": '{"model_type": "no-such-architecture"}'},
        {"config.json": "{}"},
    ],
    ids=["empty", "not-json", "binary", "unknown-type", "no-type"],
)
def test_an_unloadable_model_folder_is_one_config_error_naming_model_name(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (load_config, load_tokenizer, load_skeleton):
        with pytest.raises(ConfigError) as e:
            load(tcfg(tmp_path))
        assert f"transformer_config.model_name={str(tmp_path)!r}" in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(ConfigError, match="transformer_config.model_name"):
        load_model(tcfg(tmp_path), [])


@pytest.mark.parametrize("name", ["no/such-model", "a-file", "a\x00b"])
def test_a_model_name_that_is_no_folder_and_not_cached_names_the_download(tmp_path, name):
    if name == "a-file":
        (tmp_path / "a-file").write_text("weights?")
        name = str(tmp_path / "a-file")
    with pytest.raises(ConfigError) as e:
        load_config(TransformerConfig(model_name=name))
    assert "hf download" in str(e.value) and f"model_name={name!r}" in str(e.value)


@pytest.mark.parametrize(
    "config_json",
    ["[1, 2]", '"a string"', "5", "null", '{"model_type": ["llama"]}', '{"model_type": "llama", "hidden_size": "x"}'],
    ids=["list", "string", "number", "null", "type-list", "width-string"],
)
def test_a_config_json_of_the_wrong_shape_is_one_config_error(tmp_path, config_json):
    # transformers raises TypeError (or its own validation error) for these, not OSError/ValueError.
    (tmp_path / "config.json").write_text(config_json)
    for load in (load_config, load_tokenizer, load_skeleton, lambda t: load_model(t, [])):
        with pytest.raises(ConfigError) as e:
            load(tcfg(tmp_path))
        assert f"transformer_config.model_name={str(tmp_path)!r}" in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize(
    "name",
    ["y" * 300, "x/" + "y" * 5000, "/".join(["y" * 200] * 30)],
    ids=["long-part", "long-hub-id", "long-path"],
)
def test_a_model_name_no_path_can_have_is_one_config_error_not_an_oserror(name):
    assert shipped_config(name) is None
    for load in (load_config, load_tokenizer, load_skeleton, lambda t: load_model(t, [])):
        with pytest.raises(ConfigError) as e:
            load(TransformerConfig(model_name=name, device="cpu"))
        text = str(e.value)
        assert (
            text.startswith(f"transformer_config.model_name={name[:80]!r}...") and f"({len(name)} characters)" in text
        )
        assert len(text) < 1500, "the name is shown cut"


def test_local_config_reads_a_folders_config_json_without_transformers(tmp_path):
    from activault.collection.model import local_config

    assert local_config(str(tmp_path)) is None  # no config.json
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    assert local_config(str(tmp_path)) == {"model_type": "llama", "hidden_size": 8}
    (tmp_path / "config.json").write_text("[1, 2]")
    assert local_config(str(tmp_path)) is None  # transformers names that problem when it loads it
    assert local_config("meta-llama/Llama-3.3-70B-Instruct") is None  # a hub id, not a folder
