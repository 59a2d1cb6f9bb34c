"""Facts about a model's architecture read from its transformers config: one place for all of them."""

from __future__ import annotations

from typing import Any

# Families whose checkpoints are encoders (bidirectional attention) unless config.is_decoder.
ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "distilbert",
    "albert",
    "electra",
    "camembert",
    "deberta",
    "deberta-v2",
    "mpnet",
    "modernbert",
    "ernie",
    "nomic_bert",
    "megatron-bert",
    "esm",
}


def text_config(config: Any) -> Any:
    """The language part of a config (multimodal models nest it; plain ones are their own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def n_layers(config: Any) -> int | None:
    """Number of blocks the config declares, or None when it does not say."""
    n = getattr(text_config(config), "num_hidden_layers", None)
    return int(n) if n is not None else None


def d_model(config: Any) -> int:
    return int(text_config(config).hidden_size)


def is_causal_lm(config: Any) -> bool:
    """True for decoders (AutoModelForCausalLM), False for encoders such as BERT (AutoModel)."""
    if getattr(config, "is_decoder", False):
        return True
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return getattr(config, "model_type", "") not in ENCODER_TYPES


def attention_windows(config: Any) -> dict[str, int | None]:
    """Sliding window per attention layer type (None = full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        # Mistral-style: no layer types, every layer slides when sliding_window is set.
        return {"sliding_attention" if window else "full_attention": window}
    return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(types)}
