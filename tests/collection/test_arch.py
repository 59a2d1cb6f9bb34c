"""collection/arch.py: architecture facts read from transformers configs (blocks, width, causal or not,
attention windows), checked against the numbers the tiny models were built with and saved."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, LlamaConfig, LlavaConfig

from activault.collection import arch
from activault.tools.tiny import ARCHITECTURES, model_config


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_facts_of_saved_models_equal_their_config_json(tiny_model_dir, name):
    path = tiny_model_dir(name)
    saved = json.loads((path / "config.json").read_text())  # read here, not through transformers
    config = AutoConfig.from_pretrained(path)
    assert arch.n_layers(config) == saved.get("num_hidden_layers", saved.get("n_layer")) == 4
    assert arch.d_model(config) == saved.get("hidden_size", saved.get("n_embd")) == 64
    assert arch.is_causal_lm(config) is (name != "bert")
    assert arch.text_config(config) is config, "a plain config is its own language part"


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("layers,d", [(2, 32), (5, 48)])
def test_facts_of_every_tiny_architecture(name, layers, d):
    config = model_config(name, layers=layers, d=d)
    assert (arch.n_layers(config), arch.d_model(config)) == (layers, d)
    assert isinstance(arch.n_layers(config), int) and isinstance(arch.d_model(config), int)
    assert arch.is_causal_lm(config) is (name != "bert")


@pytest.mark.parametrize(
    "name,windows",
    [
        ("llama", {"full_attention": None}),
        ("gpt2", {"full_attention": None}),
        ("qwen2", {"full_attention": None}),
        ("mistral", {"sliding_attention": 4096}),  # Mistral's default window, every layer
        ("gemma2", {"sliding_attention": 1024, "full_attention": None}),  # alternating layers
    ],
)
def test_attention_windows_per_layer_type(name, windows):
    config = model_config(name)
    assert arch.attention_windows(config) == windows
    types = getattr(config, "layer_types", None)
    if types:  # every layer type the config lists, in the order they first appear
        assert list(arch.attention_windows(config)) == list(dict.fromkeys(types))


def test_attention_windows_without_layer_types():
    assert arch.attention_windows(SimpleNamespace(sliding_window=256)) == {"sliding_attention": 256}
    assert arch.attention_windows(SimpleNamespace(sliding_window=None)) == {"full_attention": None}
    assert arch.attention_windows(SimpleNamespace(layer_types=[], sliding_window=None)) == {"full_attention": None}
    assert arch.attention_windows(SimpleNamespace()) == {"full_attention": None}
    mixed = SimpleNamespace(layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=8)
    assert arch.attention_windows(mixed) == {"full_attention": None, "sliding_attention": 8}


def test_a_multimodal_config_is_read_through_its_language_part():
    text = LlamaConfig(num_hidden_layers=3, hidden_size=48, intermediate_size=96, num_attention_heads=4)
    config = LlavaConfig(text_config=text.to_dict())
    assert arch.text_config(config).model_type == "llama"
    assert (arch.n_layers(config), arch.d_model(config)) == (3, 48)


@pytest.mark.parametrize(
    "config,causal",
    [
        (SimpleNamespace(model_type="bert"), False),
        (SimpleNamespace(model_type="roberta", architectures=["RobertaModel"]), False),
        (SimpleNamespace(model_type="bert", is_decoder=True), True),  # BERT as a decoder
        (SimpleNamespace(model_type="bert", architectures=["BertLMHeadModel"]), True),
        (SimpleNamespace(model_type="modernbert", architectures=None), False),
        (SimpleNamespace(model_type="brand-new-decoder"), True),  # unknown families are decoders
        (SimpleNamespace(model_type="t5", architectures=["T5ForCausalLM"]), True),
        (SimpleNamespace(), True),
    ],
)
def test_is_causal_lm(config, causal):
    assert arch.is_causal_lm(config) is causal


def test_a_config_that_does_not_say_how_many_blocks_is_none():
    assert arch.n_layers(SimpleNamespace()) is None
    assert arch.n_layers(SimpleNamespace(num_hidden_layers=None)) is None
