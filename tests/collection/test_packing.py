"""collection/packing.py: tokenization, cleaning masks, packing into isolated segments, the resumable
cursor. Every row stores exactly seq_length tokens, every document comes back whole and as it is alone,
and resuming from any batch's state yields the following batches bit for bit."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activault.collection.packing import (
    Batch,
    DataState,
    document_at,
    encode_document,
    iter_batches,
    pad_token_id,
)
from activault.collection.sources import iter_documents, resolve_source
from activault.errors import FormatError
from activault.tools.tiny import demo_texts
from support.packing import CORPUS, cfg, corpus_rows, write_jsonl

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a tiny helpful model.<|im_end|>\n"
CHAT = [
    {"role": "user", "content": "What is a hook?"},
    {"role": "assistant", "content": "A callback."},
]
TENSORS = ("input_ids", "position_ids", "segment_ids", "keep", "doc_positions")


def reassemble(batches: list[Batch], seq_length: int) -> list[tuple[list[int], list[bool]]]:
    """Documents rebuilt from the packed rows, checking the row invariants on the way."""
    docs: list[tuple[list[int], list[bool]]] = []
    for b in batches:
        assert b.input_ids.dtype == torch.int64 and b.position_ids.dtype == torch.int64
        assert b.segment_ids.dtype == torch.int32 and b.doc_positions.dtype == torch.int32
        assert b.keep.dtype == torch.bool
        for r in range(b.input_ids.shape[0]):
            seg, keep, dpos = b.segment_ids[r], b.keep[r], b.doc_positions[r]
            pos, ids = b.position_ids[r], b.input_ids[r]
            assert int(keep.sum()) == seq_length
            n = int((seg > 0).sum())
            assert (seg[:n] > 0).all() and (seg[n:] == 0).all(), "padding only at the row's end"
            assert (dpos[n:] == -1).all() and (pos[n:] == 0).all()
            assert n > 0, "rows without a real token are not emitted"
            n_seg = int(seg.max())
            assert seg[:n].tolist() == sorted(seg[:n].tolist())
            assert set(seg[:n].tolist()) == set(range(1, n_seg + 1))
            for s in range(1, n_seg + 1):
                m = seg == s
                d = dpos[m].tolist()
                assert pos[m].tolist() == list(range(len(d))), "positions restart per segment"
                assert d == list(range(d[0], d[0] + len(d))), "doc positions are contiguous"
                if d[0] == 0:
                    docs.append(([], []))
                else:  # a split document continues as the first segment of the next row
                    assert s == 1
                    assert d[0] == len(docs[-1][0])
                assert keep[m][0] or d[0] == 0, "a continued piece starts with a stored token"
                docs[-1][0].extend(ids[m].tolist())
                docs[-1][1].extend(keep[m].tolist())
    return docs


def expected_docs(tok, data_cfg, **doc_kw) -> list[tuple[list[int], list[bool]]]:
    spec = resolve_source(data_cfg.data_key)
    clean = dict(
        clean_added_tokens=getattr(data_cfg, "clean_added_tokens", True),
        clean_default_system_prompt=getattr(data_cfg, "clean_default_system_prompt", True),
    )
    out = []
    for doc in iter_documents(spec, seed=data_cfg.seed, shuffle_buffer=data_cfg.shuffle_buffer, **doc_kw):
        ids, keep = encode_document(doc, tok, **clean)
        if any(keep):
            out.append((ids, keep))
    return out


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize(
    "clean,seq_length",
    [(True, 48), (False, 48), (True, 7), (True, 400)],
    ids=["clean", "raw", "short", "long"],
)
def test_packing_reproduces_every_document(tok, clean, seq_length):
    c = cfg(seq_length=seq_length, clean_added_tokens=clean, clean_default_system_prompt=clean)
    batches = list(iter_batches(c, tok))
    docs = reassemble(batches, seq_length)
    assert docs == expected_docs(tok, c)
    assert all(len(b.keep) == 4 for b in batches[:-1])
    width = [int((~b.keep[r] & (b.segment_ids[r] > 0)).sum()) + seq_length for b in batches for r in range(len(b.keep))]
    assert [b.input_ids.shape[1] for b in batches] == [max(width[i : i + 4]) for i in range(0, len(width), 4)], (
        "forward length is seq_length plus the row's cleaned tokens"
    )
    if not clean:
        assert all(b.input_ids.shape[1] == seq_length for b in batches)


def test_split_documents_and_padding_at_the_end(tok):
    c = cfg(seq_length=16, batch_size=3)
    batches = list(iter_batches(c, tok))
    assert any(b.state.token_offset > 0 for b in batches), "some documents are split across batches"
    continued = [b.doc_positions[r, 0] > 0 for b in batches for r in range(len(b.keep))]
    assert sum(continued) > 10
    last = batches[-1]
    assert last.state.exhausted and not any(b.state.exhausted for b in batches[:-1])
    assert last.state.docs_done == len(list(iter_documents(resolve_source(CORPUS))))
    row = last.keep.shape[0] - 1
    stored_pad = last.keep[row] & (last.doc_positions[row] == -1)
    assert int(last.keep[row].sum()) == 16
    assert (last.input_ids[row][stored_pad] == tok.pad_token_id).all()
    assert (last.segment_ids[row][stored_pad] == 0).all()
    assert list(iter_batches(c, tok, state=last.state)) == []


def test_last_batch_may_be_short_and_padding_is_stored(tmp_path, tok):
    path = write_jsonl(tmp_path / "few.jsonl", [{"text": "one two three"}, {"text": "four"}])
    batches = list(iter_batches(cfg(str(path), seq_length=64, batch_size=4, clean_added_tokens=True), tok))
    assert len(batches) == 1 and batches[0].keep.shape == (1, 66), "64 stored + 2 cleaned BOS"
    b = batches[0]
    real = int((b.segment_ids[0] > 0).sum())
    assert int(b.keep[0].sum()) == 64 and (b.doc_positions[0, real:] == -1).all()
    assert b.state == DataState(2, 0, True)


def test_empty_documents_are_skipped_but_counted(tmp_path, tok):
    rows: list[dict] = [
        {"text": ""},
        {"text": "alpha beta"},
        {"text": ""},
        {"messages": []},
        {"text": "gamma"},
        {"text": ""},
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    assert len(list(iter_documents(resolve_source(str(path))))) == 5, "an empty chat is no document"
    batches = list(iter_batches(cfg(str(path), seq_length=4, batch_size=1, clean_added_tokens=True), tok))
    assert batches[-1].state == DataState(5, 0, True)
    assert len(reassemble(batches, 4)) == 2


def test_resume_from_every_batch_is_bitwise_equal(tmp_path, tok):
    rows = corpus_rows()
    path = write_jsonl(tmp_path / "small.jsonl", rows[:40] + [r for r in rows if "messages" in r])
    c = cfg(str(path), seq_length=40, batch_size=3, shuffle_buffer=20, seed=3)
    batches = list(iter_batches(c, tok))
    assert any(b.state.token_offset > 0 for b in batches)

    def same(a: Batch, b: Batch) -> bool:
        keys = ("input_ids", "position_ids", "segment_ids", "keep", "doc_positions", "documents")
        return a.state == b.state and all(torch.equal(getattr(a, k), getattr(b, k)) for k in keys)

    for i, b in enumerate(batches):
        state = DataState.from_dict(json.loads(json.dumps(b.state.to_dict())))
        resumed = list(itertools.islice(iter_batches(c, tok, state=state), 2))
        assert len(resumed) == len(batches[i + 1 : i + 3])
        assert all(same(x, y) for x, y in zip(resumed, batches[i + 1 : i + 3], strict=True))
    for i in (0, len(batches) // 2):
        rest = list(iter_batches(c, tok, state=batches[i].state))
        assert len(rest) == len(batches) - i - 1 and all(map(same, rest, batches[i + 1 :]))


# ---------------------------------------------------------------- cleaning


def kept_text(tok, ids, keep) -> str:
    return tok.decode([i for i, k in zip(ids, keep, strict=True) if k])


def test_plain_text_bos_is_cleaned(tok):
    text = demo_texts()[0]
    ids, keep = encode_document(text, tok, clean_added_tokens=True, clean_default_system_prompt=True)
    assert ids[0] == tok.bos_token_id and keep == [False] + [True] * (len(ids) - 1)
    assert kept_text(tok, ids, keep) == text
    _, keep = encode_document(text, tok, clean_added_tokens=False, clean_default_system_prompt=True)
    assert all(keep)


def test_default_system_prompt_is_cleaned_exactly(tok):
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert DEFAULT_SYSTEM in rendered
    ids, keep = encode_document(CHAT, tok, clean_added_tokens=False, clean_default_system_prompt=True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert kept_text(tok, ids, keep) == rendered.replace(DEFAULT_SYSTEM, "")
    ids, keep = encode_document(CHAT, tok, clean_added_tokens=True, clean_default_system_prompt=True)
    assert kept_text(tok, ids, keep) == "user\nWhat is a hook?\nassistant\nA callback.\n"
    ids, keep = encode_document(CHAT, tok, clean_added_tokens=False, clean_default_system_prompt=False)
    assert all(keep)


def test_explicit_system_prompt_is_kept(tok):
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    ids, keep = encode_document(chat, tok, clean_added_tokens=False, clean_default_system_prompt=True)
    assert all(keep) and "Be brief." in kept_text(tok, ids, keep)
    ids, keep = encode_document(chat, tok, clean_added_tokens=True, clean_default_system_prompt=True)
    assert kept_text(tok, ids, keep).startswith("system\nBe brief.\nuser\n")


def test_llama3_style_default_system_prompt(tok):
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    block = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n<|eot_id|>"
    tok.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
        + block.replace("\n", "\\n").join(["{{ '", "' }}"])
        + "{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    )
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert rendered.startswith("<s>" + block)
    ids, keep = encode_document(CHAT, tok, clean_added_tokens=False, clean_default_system_prompt=True)
    assert kept_text(tok, ids, keep) == rendered.replace(block, "")
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    _, keep = encode_document(chat, tok, clean_added_tokens=False, clean_default_system_prompt=True)
    assert all(keep)


def test_template_without_default_system_is_untouched(tok):
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    _, keep = encode_document(CHAT, tok, clean_added_tokens=False, clean_default_system_prompt=True)
    assert all(keep)


def test_failing_template_falls_back_with_a_warning(tok, caplog):
    tok.chat_template = "{{ raise_exception('no chats here') }}"
    with caplog.at_level(logging.WARNING, logger="activault.collection.packing"):
        ids, keep = encode_document(CHAT, tok, clean_added_tokens=True, clean_default_system_prompt=True)
    assert "no chats here" in caplog.text
    assert kept_text(tok, ids, keep) == "user: What is a hook?\n\nassistant: A callback."


# ---------------------------------------------------------------- the cursor and raw chats


def test_data_state_round_trip():
    s = DataState(docs_done=7, token_offset=3)
    assert DataState.from_dict(s.to_dict()) == s and DataState.from_dict({}) == DataState()


def test_encode_document_repairs_raw_chats(tok):
    raw = [{"from": "gpt", "value": "x"}, {"from": "human", "value": "What is a hook?"}]
    raw += [{"from": "gpt", "value": "A callback."}]
    assert encode_document(raw, tok, clean_added_tokens=True, clean_default_system_prompt=True) == (
        encode_document(CHAT, tok, clean_added_tokens=True, clean_default_system_prompt=True)
    )
    assert encode_document([], tok, clean_added_tokens=True, clean_default_system_prompt=True) == (
        [],
        [],
    )


# ---------------------------------------------------------------- properties over random documents

WORDS = "the a hook layer token model state row packed segment résumé 東京 ✓ 42 -- \n".split(" ")


def random_doc(rng: random.Random) -> dict:
    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    if rng.random() < 0.25:
        return {
            "messages": [
                {"role": "user", "content": text(rng.randint(1, 8))},
                {"role": "assistant", "content": text(rng.randint(0, 8))},
            ]
        }
    return {"text": text(rng.choice([0, 1, 2, rng.randint(3, 60)]))}


def same(a: Batch, b: Batch) -> bool:
    return a.state == b.state and all(torch.equal(getattr(a, k), getattr(b, k)) for k in (*TENSORS, "documents"))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_docs=st.integers(1, 25),
    seq_length=st.integers(1, 40),
    batch_size=st.integers(1, 5),
    clean=st.booleans(),
)
def test_any_documents_pack_into_full_rows_that_give_every_document_back(
    tok, seed, n_docs, seq_length, batch_size, clean
):
    rng = random.Random(seed)
    rows = [random_doc(rng) for _ in range(n_docs)]
    with tempfile.TemporaryDirectory() as d:
        c = cfg(
            str(write_jsonl(Path(d) / "r.jsonl", rows)),
            seq_length=seq_length,
            batch_size=batch_size,
            clean_added_tokens=clean,
            clean_default_system_prompt=clean,
        )
        batches = list(iter_batches(c, tok))
        expected = expected_docs(tok, c)
        assert reassemble(batches, seq_length) == expected, "packed equals each document alone"
        kept = sum(sum(keep) for _, keep in expected)
        n_rows = math.ceil(kept / seq_length)  # an independent count: full rows, the last one padded
        assert sum(len(b.keep) for b in batches) == n_rows
        assert [len(b.keep) for b in batches] == [min(batch_size, n_rows - i) for i in range(0, n_rows, batch_size)]
        stored_pad = sum(int((b.keep & (b.doc_positions == -1)).sum()) for b in batches)
        assert stored_pad == n_rows * seq_length - kept, "padding only completes the very last row"
        if batches:
            assert batches[-1].state == DataState(len(list(iter_documents(resolve_source(c.data_key)))), 0, True)
        for i in sorted({0, len(batches) // 2, len(batches) - 1} & set(range(len(batches)))):
            # the cursor after a batch, through JSON, resumes to the same bits
            state = DataState.from_dict(json.loads(json.dumps(batches[i].state.to_dict())))
            rest = list(iter_batches(c, tok, state=state))
            assert len(rest) == len(batches) - i - 1 and all(map(same, rest, batches[i + 1 :]))


def test_a_document_packs_the_same_whatever_it_is_packed_with(tmp_path, tok):
    """The same document after different neighbours, at different places in a row: the model sees the
    same ids at the same positions, and the same tokens are stored."""
    doc = {"text": "the hook reads the residual stream of a packed segment"}
    others = [{"text": "alpha beta gamma"}, {"text": "a much longer neighbour " * 5}, {"text": "x"}]
    seen = []
    for i, before in enumerate([[], others[:1], others, others[::-1]]):
        c = cfg(str(write_jsonl(tmp_path / f"{i}.jsonl", [*before, doc, others[0]])), seq_length=200, batch_size=1)
        (batch,) = list(iter_batches(c, tok))
        seg = batch.segment_ids[0]
        target = len(before) + 1  # every document fits: one segment each, in order
        m = seg == target
        seen.append(tuple(getattr(batch, k)[0][m].tolist() for k in TENSORS if k != "segment_ids"))
        assert batch.position_ids[0][m].tolist() == list(range(int(m.sum()))), "positions restart at 0"
    ids, keep = encode_document(doc["text"], tok, clean_added_tokens=False, clean_default_system_prompt=False)
    assert seen[0] == (ids, list(range(len(ids))), keep, list(range(len(ids))))
    assert all(s == seen[0] for s in seen)


def test_a_split_document_continues_where_it_stopped_with_fresh_positions(tmp_path, tok):
    long = {"text": " ".join(f"w{i}" for i in range(80))}
    c = cfg(str(write_jsonl(tmp_path / "l.jsonl", [{"text": "short first"}, long])), seq_length=16, batch_size=2)
    batches = list(iter_batches(c, tok))
    pieces = [
        (b.doc_positions[r][b.segment_ids[r] == s], b.position_ids[r][b.segment_ids[r] == s])
        for b in batches
        for r in range(len(b.keep))
        for s in b.segment_ids[r].unique().tolist()
        if s > 0
    ][1:]  # the long document's pieces
    assert len(pieces) > 3
    dpos = torch.cat([d for d, _ in pieces]).tolist()
    assert dpos == list(range(len(dpos))), "doc positions count on across rows"
    assert all(p.tolist() == list(range(len(p))) for _, p in pieces), "each piece is a fresh segment"
    assert all(b.state.token_offset > 0 for b in batches[:-1] if not b.state.exhausted)


@pytest.mark.parametrize("num_runs", [2, 3])
def test_resume_holds_on_every_machine(tok, num_runs):
    c = cfg(seq_length=40, batch_size=4)
    for machine in range(num_runs):
        batches = list(iter_batches(c, tok, machine=machine, num_runs=num_runs))
        for i in (1, len(batches) // 2):
            rest = list(iter_batches(c, tok, machine=machine, num_runs=num_runs, state=batches[i].state))
            assert len(rest) == len(batches) - i - 1 and all(map(same, rest, batches[i + 1 :]))


def test_resume_from_a_later_state_skips_exactly_what_was_done(tok):
    c = cfg(seq_length=20, batch_size=3)
    batches = list(iter_batches(c, tok))
    resumed = list(itertools.islice(iter_batches(c, tok, state=batches[4].state), 3))
    assert all(map(same, resumed, batches[5:8]))
    exhausted = DataState(docs_done=10**6, exhausted=True)
    assert list(iter_batches(c, tok, state=exhausted)) == []


def test_the_cursor_serializes_as_plain_json_fields():
    s = DataState(docs_done=12, token_offset=7, exhausted=False, bad_records=3)
    assert json.loads(json.dumps(s.to_dict())) == {
        "docs_done": 12,
        "token_offset": 7,
        "exhausted": False,
        "bad_records": 3,
    }
    assert DataState.from_dict({"docs_done": 12, "token_offset": 7, "bad_records": 3}) == s
    with pytest.raises(AttributeError):
        s.docs_done = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "damaged,problem",
    [
        ({"exhausted": "false"}, "field 'exhausted' is 'false', not true/false"),  # was: finished, collects nothing
        ({"exhausted": 0}, "field 'exhausted' is 0, not true/false"),
        ({"docs_done": "x"}, "field 'docs_done' is 'x', not a whole number"),
        ({"docs_done": None}, "field 'docs_done' is None, not a whole number"),
        ({"docs_done": [1]}, "field 'docs_done' is [1], not a whole number"),
        ({"docs_done": 2.0}, "field 'docs_done' is 2.0, not a whole number"),
        ({"docs_done": True}, "field 'docs_done' is True, not a whole number"),
        ({"docs_done": -1}, "field 'docs_done' is -1, not a whole number"),
        ({"docs_done": 1 << 63}, "not a whole number in 0..2**62"),
        ({"token_offset": -3}, "field 'token_offset' is -3"),  # was: a malformed Batch
        ({"bad_records": "2"}, "field 'bad_records' is '2'"),
        ({"exhausted": True, "token_offset": 4}, "exhausted with token_offset 4"),
        ({"row": 5}, "unknown field(s) ['row']"),  # an import's cursor is not a collection's
        ([1, 2], "data_state is a JSON list, not an object"),
        ("cursor", "data_state is a JSON str, not an object"),
    ],
)
def test_a_damaged_cursor_is_refused_naming_its_field(damaged, problem):
    with pytest.raises(FormatError) as e:
        DataState.from_dict(damaged)
    assert problem in str(e.value)


def test_a_cursor_from_json_is_taken_as_it_is_and_resumes_the_same(tok):
    c = cfg(seq_length=20, batch_size=3)
    first = list(itertools.islice(iter_batches(c, tok), 3))
    stored = json.loads(json.dumps(first[1].state.to_dict()))
    assert DataState.from_dict(stored) == first[1].state
    resumed = next(iter_batches(c, tok, state=DataState.from_dict(stored)))
    assert same(resumed, first[2])


@pytest.mark.parametrize("pad,eos,expected", [(3, 2, 3), (None, 2, 2), (None, None, 0), (0, 9, 0), ("3", 2, 2)])
def test_rows_are_padded_with_pad_else_eos_else_zero(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


@pytest.mark.parametrize("garbage", [5, None, 3.5, {"role": "user"}, [], [None, 7], "not a chat"])
def test_documents_that_are_no_text_and_no_chat_store_nothing(tok, garbage):
    ids, keep = encode_document(garbage, tok, clean_added_tokens=True, clean_default_system_prompt=True)
    if isinstance(garbage, str):
        assert tok.decode([i for i, k in zip(ids, keep, strict=True) if k]) == garbage
    else:
        assert not any(keep)


def test_control_characters_and_long_documents_survive_packing(tmp_path, tok):
    texts = ["nul\x00inside", "\x1b[31mred\x1b[0m", "tab\tand\r\nnewlines", "ü" * 3000]
    c = cfg(
        str(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])),
        seq_length=32,
        batch_size=8,
        clean_added_tokens=True,
    )
    docs = reassemble(list(iter_batches(c, tok)), 32)
    assert [tok.decode([i for i, k in zip(ids, keep, strict=True) if k]) for ids, keep in docs] == texts


# ---------------------------------------------------------------- provenance


@pytest.mark.parametrize("num_runs", [1, 2])
def test_each_token_names_its_document_in_the_machines_stream(tmp_path, tok, num_runs):
    rows = [{"text": ""}, {"text": "alpha beta gamma delta"}, {"messages": []}, {"text": "epsilon"}]
    rows += corpus_rows()[:30]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    c = cfg(str(path), seq_length=16, batch_size=3, shuffle_buffer=8, seed=5)
    for machine in range(num_runs):
        spec = resolve_source(str(path))
        stream = list(iter_documents(spec, machine=machine, num_runs=num_runs, seed=5, shuffle_buffer=8))
        batches = list(iter_batches(c, tok, machine=machine, num_runs=num_runs))
        seen: dict[int, list[tuple[int, int]]] = {}
        for b in batches:
            assert b.documents.dtype == torch.int64
            assert torch.equal(b.documents < 0, b.doc_positions < 0), "padding is -1 in both"
            for r in range(len(b.keep)):
                row = (b.documents[r].tolist(), b.doc_positions[r].tolist(), b.input_ids[r].tolist())
                for d, p, i in zip(*row, strict=True):
                    if d >= 0:
                        seen.setdefault(d, []).append((p, i))
        assert seen, "some document was stored"
        for d, tokens in seen.items():  # the ordinal finds the document again, ids at their positions
            doc = document_at(c, d, machine=machine, num_runs=num_runs)
            assert doc == stream[d]
            ids, _ = encode_document(doc, tok, clean_added_tokens=True, clean_default_system_prompt=True)
            assert [ids[p] for p, _ in tokens] == [i for _, i in tokens]
        assert document_at(c, len(stream), machine=machine, num_runs=num_runs) is None


# ---------------------------------------------------------------- tokenizer warnings


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_documents_longer_than_the_model_are_tokenized_without_a_length_warning(tmp_path, tok_dir):
    """transformers warns "N > model_max_length" once per tokenizer; rows are seq_length long, so the
    warning is wrong here and must not be printed (its logger does not propagate: a handler on it)."""
    from transformers import AutoTokenizer

    long_text = " ".join(demo_texts()[:20])
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}, {"messages": [*CHAT] * 30}])
    seen = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(seen)
    try:
        control = AutoTokenizer.from_pretrained(tok_dir, model_max_length=32)
        assert len(control(long_text)["input_ids"]) > 32
        assert any("> 32" in m for m in seen.messages), "the detector sees the warning of a plain call"
        seen.messages.clear()
        quiet = AutoTokenizer.from_pretrained(tok_dir, model_max_length=32)
        batches = list(iter_batches(cfg(str(path), seq_length=16, batch_size=2), quiet))
    finally:
        logger.removeHandler(seen)
    assert sum(int(b.keep.sum()) for b in batches) > 64  # both documents, longer than the model, were packed
    assert [m for m in seen.messages if "sequence length" in m] == []
