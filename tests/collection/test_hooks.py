"""Hooked activations equal independent computations; packed documents equal documents alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from activault.collection.hooks import Capture, find_blocks, hook_dims, resolve_hooks
from activault.collection.model import load_model, load_skeleton
from activault.config import TransformerConfig
from activault.errors import ConfigError

CAUSAL = ["llama", "gpt2", "gemma2", "qwen2", "mistral", "gpt_neox"]
# An arbitrary module path (not a block, attention or MLP) for each architecture.
DEEP = {
    "llama": "model.layers.1.mlp.down_proj",
    "gpt2": "transformer.h.1.attn.c_proj",
    "bert": "encoder.layer.1.attention.self.query",
}
STANDARD = [
    "models.layers.1.pre",
    "models.layers.1.post",
    "models.layers.1.self_attn.pre",
    "models.layers.1.self_attn.post",
    "models.layers.1.mlp.pre",
    "models.layers.1.mlp.post",
]


def tcfg(path, attn="eager", **kw):
    return TransformerConfig(model_name=str(path), dtype="float32", attn_implementation=attn, device="cpu", **kw)


def reference(path, arch, attn="eager"):
    """The full model, loaded by transformers directly."""
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn).eval()


def alone(n):
    """Inputs for one document of n tokens: [1, n] positions and segment ids."""
    return torch.arange(n)[None], torch.ones(1, n, dtype=torch.int32)


def cloned_io(model, specs, ids):
    """Independent capture: our own hooks that clone, on a plain transformers forward."""
    got: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []

    def pre(name):
        def hook(module, args, kwargs):
            got.setdefault(name, (args[0] if args else kwargs["hidden_states"]).clone())

        return hook

    def post(name):
        def hook(module, args, output):
            got.setdefault(name, (output if isinstance(output, torch.Tensor) else output[0]).clone())

        return hook

    for s in specs:
        m = modules[s.module]
        if s.kind == "pre":
            handles.append(m.register_forward_pre_hook(pre(s.name), with_kwargs=True))
        else:
            handles.append(m.register_forward_hook(post(s.name)))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    return got, hidden


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_every_hook_kind_equals_independent_computation(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = reference(path, arch)
    names = [*STANDARD, f"{DEEP[arch]}.pre", f"{DEEP[arch]}.post"]
    specs = resolve_hooks(model, names)
    ids = torch.randint(5, 500, (1, 12))
    with Capture(model, specs) as cap:
        out = cap(ids, *alone(12))
    ref, hidden = cloned_io(model, specs, ids)
    for name in names:
        assert out[name].shape[:2] == (1, 12)
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=1e-5, msg=name)
    # Residual stream: block 1 input/output are hidden_states[1] / [2].
    torch.testing.assert_close(out["models.layers.1.pre"], hidden[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["models.layers.1.post"], hidden[2], rtol=0, atol=1e-5)
    # The MLP recomputed on its captured input gives its captured output.
    block = find_blocks(model)[1][1]
    with torch.no_grad():
        if arch == "bert":
            mlp_out = block.output.dense(block.intermediate(out["models.layers.1.mlp.pre"]))
        else:
            mlp_out = block.mlp(out["models.layers.1.mlp.pre"])
    torch.testing.assert_close(out["models.layers.1.mlp.post"], mlp_out, rtol=0, atol=1e-5)


def pack(docs, row_len):
    """One row holding `docs` back to back, then padding: ids, positions, segments [1, row_len]."""
    ids = torch.zeros(1, row_len, dtype=torch.long)
    pos = torch.zeros(1, row_len, dtype=torch.long)
    seg = torch.zeros(1, row_len, dtype=torch.int32)
    at = 0
    for k, d in enumerate(docs):
        ids[0, at : at + len(d)] = d
        pos[0, at : at + len(d)] = torch.arange(len(d))
        seg[0, at : at + len(d)] = k + 1
        at += len(d)
    return ids, pos, seg


@pytest.mark.parametrize(
    "arch, attn",
    [(arch, attn) for arch in [*CAUSAL, "bert"] for attn in ("eager", "sdpa") if (arch, attn) != ("gemma2", "sdpa")],
)
def test_packed_documents_equal_documents_alone(tiny_model_dir, arch, attn):
    model = load_model(tcfg(tiny_model_dir(arch), attn), [])
    names = ["models.layers.0.post", "models.layers.-1.self_attn.post", "models.layers.-1.post"]
    specs = resolve_hooks(model, names)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 500, (n,), generator=g) for n in (5, 8, 4)]
    # Two rows (batch of 2): three documents + padding, and two documents in the other order.
    rows = [pack(docs, 20), pack([docs[2], docs[0]], 20)]
    ids, pos, seg = (torch.cat(t) for t in zip(*rows, strict=True))
    with Capture(model, specs) as cap:
        packed = cap(ids, pos, seg)
        for row, order in ((0, [0, 1, 2]), (1, [2, 0])):
            at = 0
            for k in order:
                n = len(docs[k])
                single = cap(docs[k][None], *alone(n))
                for name in names:
                    got = packed[name][row, at : at + n]
                    assert not got.isnan().any()
                    diff = (got - single[name][0]).abs().max().item()
                    assert diff < 1e-4, (name, row, k, diff)
                at += n
        assert not any(t.isnan().any() for t in packed.values())  # padding rows included


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_sliding_window_matches_transformers(tiny_model_dir, arch):
    """Our packed mask applies the sliding window exactly as transformers' own mask does."""
    model = reference(tiny_model_dir(arch), arch)
    model.config.sliding_window = 3
    specs = resolve_hooks(model, ["models.layers.-1.post", "models.layers.0.post"])
    ids = torch.randint(5, 500, (1, 10))
    ref, _ = cloned_io(model, specs, ids)
    with Capture(model, specs) as cap:
        out = cap(ids, *alone(10))
    for s in specs:
        torch.testing.assert_close(out[s.name], ref[s.name], rtol=0, atol=1e-5)


def test_final_norm_hook_keeps_every_block(tiny_model_dir):
    path = tiny_model_dir("llama")
    specs = resolve_hooks(load_skeleton(tcfg(path)), ["model.norm.post", "models.layers.-1.post"])
    assert [s.block for s in specs] == [None, 3]
    model = load_model(tcfg(path), specs)
    assert len(find_blocks(model)[1]) == 4
    ids = torch.randint(5, 500, (1, 7))
    with Capture(model, specs) as cap:
        out = cap(ids, *alone(7))
    _, hidden = cloned_io(reference(path, "llama"), [], ids)
    torch.testing.assert_close(out["model.norm.post"], hidden[-1], rtol=0, atol=1e-5)
    # The residual after the last block is the block's output, not the final norm's.
    assert not torch.allclose(out["models.layers.-1.post"], out["model.norm.post"])


def test_skeleton_validates_names_and_dims_without_weights(tiny_model_dir):
    skeleton = load_skeleton(tcfg(tiny_model_dir("llama")))
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    specs = resolve_hooks(
        skeleton,
        ["models.layers.-1.post", "models.layers.2.mlp.pre", "model.layers.0.mlp.up_proj.post"],
    )
    assert [(s.module, s.kind, s.block) for s in specs] == [
        ("model.layers.3", "post", 3),
        ("model.layers.2.mlp", "pre", 2),
        ("model.layers.0.mlp.up_proj", "post", 0),
    ]
    assert hook_dims(skeleton, specs) == {
        "models.layers.-1.post": 64,
        "models.layers.2.mlp.pre": 64,
        "model.layers.0.mlp.up_proj.post": 128,
    }


@pytest.mark.parametrize("arch", ["gpt2", "bert", "gpt_neox"])
def test_aliases_resolve_per_architecture(tiny_model_dir, arch):
    skeleton = load_skeleton(tcfg(tiny_model_dir(arch)))
    got = {s.name: s.module for s in resolve_hooks(skeleton, STANDARD[2:])}
    want = {
        "gpt2": ("transformer.h.1.attn", "transformer.h.1.mlp", "transformer.h.1.mlp"),
        "bert": (
            "encoder.layer.1.attention",
            "encoder.layer.1.intermediate",
            "encoder.layer.1.output.dense",
        ),
        "gpt_neox": (
            "gpt_neox.layers.1.attention",
            "gpt_neox.layers.1.mlp",
            "gpt_neox.layers.1.mlp",
        ),
    }[arch]
    assert list(got.values()) == [want[0], want[0], want[1], want[2]]


@pytest.mark.parametrize(
    "name",
    ["models.layers.9.post", "models.layers.1.mlp", "model.layers.1.nope.post", "lm_head.input"],
)
def test_unknown_hook_lists_valid_names(tiny_model_dir, name):
    skeleton = load_skeleton(tcfg(tiny_model_dir("llama")))
    with pytest.raises(ConfigError) as err:
        resolve_hooks(skeleton, [name])
    msg = str(err.value)
    assert name in msg
    if "9" not in name:
        assert "models.layers.3.post" in msg and "model.layers.3.self_attn.post" in msg
