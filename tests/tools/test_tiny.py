"""tools/tiny.py: tiny random-weight models and a locally trained tokenizer (nothing from a hub): the
shapes asked for, a lossless tokenizer whose special ids match the model's, reproducible weights."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from activault.tools.tiny import ARCHITECTURES, CHAT_TEMPLATE, build_model, build_tokenizer, demo_texts, model_config


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def test_demo_texts_are_the_packaged_corpus_text_rows():
    rows = [
        json.loads(line) for line in resources.files("activault").joinpath("demo_corpus.jsonl").read_text().splitlines()
    ]
    texts = demo_texts()
    assert texts == [r["text"] for r in rows if "text" in r]
    assert len(texts) > 50 and all(isinstance(t, str) and t for t in texts)


def test_the_tokenizer_is_byte_level_and_lossless(tok):
    for text in [*demo_texts()[:20], "résumé 東京 ✓ \x00\t\n", "", " leading and trailing "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_the_tokenizers_specials_are_the_ids_the_models_use(tok, tiny_model_dir):
    assert len(tok) == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.vocab_size == len(tok)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert tok("plain text")["input_ids"][0] == tok.bos_token_id, "plain text gets a BOS, as Llama's does"


def test_the_chat_template_inserts_a_default_system_turn_only_without_one(tok):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<s><|im_start|>system\nYou are a tiny helpful model.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    own = [{"role": "system", "content": "Be brief."}, *chat]
    assert "tiny helpful" not in tok.apply_chat_template(own, tokenize=False)


def test_a_tokenizer_trained_on_other_texts_has_the_asked_size(tmp_path):
    texts = ["abc abd abe " * 20, "xyz xy x " * 20]
    tok = build_tokenizer(tmp_path, texts, vocab_size=300)
    assert len(tok) <= 300 and (tmp_path / "tokenizer.json").is_file()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("abc xyz")["input_ids"] == tok("abc xyz")["input_ids"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_config_has_the_asked_shape(arch):
    config = model_config(arch, vocab_size=300, layers=3, d=32)
    text = config.get_text_config()
    assert text.num_hidden_layers == 3 and text.hidden_size == 32 and text.vocab_size == 300
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.model_type == arch


@pytest.mark.parametrize("garbage", ["", "LLAMA", "llama2", "t5", "x" * 5000])
def test_an_unknown_architecture_names_the_choices(garbage):
    with pytest.raises(ValueError) as e:
        model_config(garbage)
    assert repr(garbage) in str(e.value) and all(a in str(e.value) for a in ARCHITECTURES)


def test_weights_are_reproducible_by_seed_and_saved_as_built(tmp_path):
    a = build_model(tmp_path / "a", "llama", seed=3, layers=2, d=32)
    b = build_model(tmp_path / "b", "llama", seed=3, layers=2, d=32)
    c = build_model(tmp_path / "c", "llama", seed=4, layers=2, d=32)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    assert sorted(loaded) == sorted(sa) and all(torch.equal(loaded[k], sa[k]) for k in sa)
    assert not (tmp_path / "a" / "tokenizer.json").exists(), "a model alone: build_tiny adds the tokenizer"


def test_build_tiny_folders_load_with_transformers(tiny_model_dir):
    path = tiny_model_dir("llama")
    assert {"config.json", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 4
    with torch.no_grad():
        logits = model(**tok(["a short text"], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
