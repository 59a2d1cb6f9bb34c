"""Tiny models and a locally trained tokenizer, for the demo and the tests (nothing from a hub)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

# A chat template with a default system prompt, like Qwen's and Llama 3's, so that
# `clean_default_system_prompt` has something to remove.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a tiny helpful model.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHITECTURES = ("llama", "gpt2", "bert", "gemma2", "qwen2", "mistral", "gpt_neox")


def demo_texts() -> list[str]:
    """Plain-text documents of the corpus shipped in the package."""
    out = []
    with resources.files("activault").joinpath("demo_corpus.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if "text" in row:
                out.append(row["text"])
    return out


def build_tokenizer(path: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts if texts is not None else demo_texts()), trainer=trainer)
    from tokenizers import processors

    bos = tok.token_to_id("<s>")
    # Plain text gets a BOS, as Llama's tokenizer does; chat text already has it from the template.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def model_config(arch: str, vocab_size: int = 512, layers: int = 4, d: int = 64):
    """A small random-weight config of the given architecture family."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch in ("llama", "mistral", "qwen2", "gemma2"):
        extra = dict(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        if arch == "gemma2":
            extra.update(head_dim=16, sliding_window=1024, query_pre_attn_scalar=16)
        return AutoConfig.for_model(arch, **common, **extra)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", **common, n_embd=d, n_layer=layers, n_head=4, n_positions=2048)
    if arch in ("gpt_neox", "bert"):
        return AutoConfig.for_model(
            arch,
            **common,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=2048,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


def build_model(path: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs):
    """Save a random-weight model of `arch` (and nothing else) to `path`."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = model_config(arch, **config_kwargs)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    model.save_pretrained(str(path))
    return model


def build_tiny(path: str | Path, arch: str = "llama", **config_kwargs) -> Path:
    """Tokenizer and model in one folder, loadable by `from_pretrained(path)`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    build_model(path, arch, vocab_size=len(tok), **config_kwargs)
    return path
