"""evaluation/splice.py: stored rows run again as collected (the hook sees the stored states), also
those of one side of a held-out split alone, the splice replaces a pre or post hook's tensor, and
the loss compares the same predicted tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from activault.collection.hooks import attention_inputs, resolve_hooks
from activault.errors import ConfigError
from activault.evaluation.splice import IGNORE, Splice, lm_loss, model_inputs, stored_rows
from activault.reading.splits import Split
from activault.storage import LocalStore
from activault.storage.s3 import S3Store
from support.collecting import load_hook
from support.synth import copy_tree, s3_env

HOOK = "models.layers.1.post"


def test_model_inputs_cut_documents_and_restart_a_continued_piece() -> None:
    ids = torch.tensor([[11, 12, 20, 21, 22, 0]])
    pos = torch.tensor([[3, 4, 0, 1, 2, -1]], dtype=torch.int32)
    docs = torch.tensor([[5, 5, 6, 6, 6, -1]])
    rows = model_inputs(ids, pos, docs, torch.tensor([True]))
    assert rows.segment_ids.tolist() == [[1, 1, 2, 2, 2, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 0, 1, 2, 0]]  # a continued piece restarts at 0
    assert rows.labels.tolist() == [[12, IGNORE, 21, 22, IGNORE, IGNORE]]  # never across documents
    fresh = model_inputs(ids, pos, docs, torch.tensor([False]))
    assert fresh.position_ids.tolist() == [[3, 4, 0, 1, 2, 0]]  # a document's start keeps its positions


def test_model_inputs_without_documents_cut_at_position_jumps() -> None:
    # Format 3 files have no document ordinals: a position that does not follow starts a piece.
    pos = torch.tensor([[7, 8, 1, 2]], dtype=torch.int32)
    rows = model_inputs(torch.arange(4)[None], pos, None, torch.tensor([False]))
    assert rows.segment_ids.tolist() == [[1, 1, 2, 2]]
    assert rows.labels.tolist() == [[1, IGNORE, 3, IGNORE]]


def _store(root, where, request):
    """The collected run's store: the local folder, or a copy of it on moto."""
    if where == "local":
        return LocalStore(root.parent)
    env = s3_env(request.getfixturevalue("moto_url"))
    store = S3Store(f"s3://{request.getfixturevalue('moto_bucket')}", env=env)
    copy_tree(root, store, "run")
    return store


def _run_stored(model_dir, store, split: Split | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the hook's states, [rows, seq] real-token mask) of the stored rows run through the model again."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    (spec,) = resolve_hooks(model, [HOOK])
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x

    pieces = []
    with torch.no_grad(), Splice(model, spec, record):
        for rows in stored_rows(store, f"run/{HOOK}", None, split):
            mask = attention_inputs(model, rows.segment_ids)  # collection's packed mask
            model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=mask, use_cache=False)
            pieces.append(rows.segment_ids > 0)
    return torch.cat(seen), torch.cat(pieces)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: absolute positions, so they must be the collected ones
@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_stored_rows_run_again_give_the_stored_states(collected_arch, arch, where, request) -> None:
    model_dir, root = collected_arch(arch)
    seen, pieces = _run_stored(model_dir, _store(root, where, request))
    stored = load_hook(root, HOOK)
    real = stored["positions"] >= 0
    assert int((~real).sum()) > 0 and int((stored["positions"][:, 0] > 0).sum()) > 0  # padding, continued rows
    assert torch.equal(pieces, real)
    assert torch.allclose(seen[real], stored["states"][real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("where", ["local", pytest.param("moto", marks=pytest.mark.s3)])
def test_a_splits_documents_run_alone_give_their_stored_states(collected, in_split, where, request) -> None:
    model_dir, root = collected
    store = _store(root, where, request)
    seen, pieces = _run_stored(model_dir, store, Split("test", 0.3, 0))
    test, stored = in_split(root, HOOK, "test", 0.3), load_hook(root, HOOK)
    some = test.any(1)  # rows holding only the other side's documents are not run
    assert 0 < int(some.sum()) < len(some) and torch.equal(pieces, test[some])
    # the other documents left out, the kept ones compute what collection stored for them
    states = seen[pieces]
    assert torch.allclose(states, stored["states"][test], atol=1e-5, rtol=1e-4)
    # max_tokens counts the split's tokens: the rows up to the one that reaches 100 of them
    few = torch.cat([r.segment_ids for r in stored_rows(store, f"run/{HOOK}", 100, Split("test", 0.3, 0))]) > 0
    assert int(few.sum()) >= 100 > int(few[:-1].sum()) and torch.equal(few, test[some][: len(few)])


class _Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.inner(x), "extra"


def test_splice_replaces_a_pre_hooks_input_and_a_post_hooks_first_output() -> None:
    from activault.collection.hooks import HookPoint

    model, x = _Pair(), torch.randn(2, 3)
    with Splice(model, HookPoint("inner.pre", "inner", "pre", None), torch.zeros_like):
        assert torch.equal(model(x)[0], model.inner.bias.expand(2, 3))  # the input was zeros
    with Splice(model, HookPoint("p.post", "", "post", None), lambda t: t + 1):
        out = model(x)
    assert torch.equal(out[0], model.inner(x) + 1) and out[1] == "extra"
    assert torch.equal(model(x)[0], model.inner(x))  # the splice is gone once closed


def test_lm_loss_names_rows_with_nothing_to_predict(collected) -> None:
    model_dir, _ = collected
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = model_inputs(torch.tensor([[5]]), torch.tensor([[0]], dtype=torch.int32), None, torch.tensor([False]))
    with pytest.raises(ConfigError, match="no stored token has a next token"):
        lm_loss(model, HOOK, lambda t: t, iter([rows]))
