"""Sources, sharding by machine, chat repair, hostile text: every property that a wrong batch would break.

Packing and cleaning are tested in test_packing.py (whose checkers of packed rows are used here too)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import torch
from test_packing import expected_docs, reassemble

from activault.collection.packing import DataState, iter_batches
from activault.collection.sources import (
    BadRecords,
    iter_documents,
    probe_local,
    repair_messages,
    require_documents,
    resolve_source,
    source_for,
)
from activault.errors import ConfigError, DataError
from activault.tools.tiny import demo_texts
from support.packing import CORPUS, cfg, corpus_rows, write_jsonl


def doc_key(doc) -> str:
    return json.dumps(doc, sort_keys=True)


# ---------------------------------------------------------------- the seeded shuffle


def test_deterministic_and_seeded(tok):
    a = list(iter_batches(cfg(shuffle_buffer=64, seed=1), tok))
    b = list(iter_batches(cfg(shuffle_buffer=64, seed=1), tok))
    c = list(iter_batches(cfg(shuffle_buffer=64, seed=2), tok))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c, strict=False))


# ---------------------------------------------------------------- sharding by machine


@pytest.fixture
def three_files(tmp_path) -> str:
    rows = corpus_rows()
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", rows[i::3])
    return str(tmp_path / "part-*.jsonl")


@pytest.mark.parametrize("source", ["one_file", "three_files"])
@pytest.mark.parametrize("num_runs", [1, 2, 3])
def test_machines_cover_every_document_once(request, tok, source, num_runs):
    key = CORPUS if source == "one_file" else request.getfixturevalue("three_files")
    spec = resolve_source(key)
    everything = Counter(doc_key(d) for d in iter_documents(spec))
    shares = [
        Counter(doc_key(d) for d in iter_documents(spec, machine=m, num_runs=num_runs, shuffle_buffer=16))
        for m in range(num_runs)
    ]
    assert sum(shares, Counter()) == everything
    assert all(shares), "every machine gets documents"
    c = cfg(key, shuffle_buffer=16)
    packed = []
    for m in range(num_runs):
        batches = list(iter_batches(c, tok, machine=m, num_runs=num_runs))
        packed += reassemble(batches, c.seq_length)
        assert batches[-1].state.exhausted
    assert Counter(doc_key(d) for d in packed) == Counter(doc_key(d) for d in expected_docs(tok, c))


def test_three_files_on_three_machines_split_by_file(tok, three_files):
    spec = resolve_source(three_files)
    files = sorted(Path(three_files).parent.glob("part-*.jsonl"))
    for m, f in enumerate(files):
        mine = list(iter_documents(spec, machine=m, num_runs=3))
        assert mine == list(iter_documents(resolve_source(str(f))))


def test_machine_out_of_range(tok):
    with pytest.raises(ConfigError, match="machine 3"):
        iter_documents(resolve_source(CORPUS), machine=3, num_runs=3)


# ---------------------------------------------------------------- chat repair


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
            [("user", "hi"), ("assistant", "hello")],
        ),
        (
            [
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            [("user", "b\n\nc")],
        ),
        (
            [
                {"role": "user", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "x"}, "y"]},
            ],
            [("user", "x\ny")],
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "u"},
                {"role": "system", "content": "late"},
                {"role": "tool", "content": "t"},
                {"role": "assistant", "content": 3},
            ],
            [("system", "s"), ("user", "u")],
        ),
        ([{"role": "system", "content": "only"}], []),
        ("not a list", []),
        ([None, 5, {"role": "user"}], []),
    ],
)
def test_repair_messages(raw, expected):
    assert [(m["role"], m["content"]) for m in repair_messages(raw)] == expected


def test_malformed_chats_do_not_crash(tmp_path, tok):
    rows: list[dict] = [
        {
            "conversations": [
                {"from": "gpt", "value": "first"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        {"conversations": [{"from": "human", "value": None}]},
        {"conversations": [{"from": "human", "value": "q1"}, {"from": "human", "value": "q2"}]},
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "q"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    docs = list(iter_documents(resolve_source(str(path))))
    assert len(docs) == 3
    batches = list(iter_batches(cfg(str(path), seq_length=8), tok))
    assert len(reassemble(batches, 8)) == 3 and batches[-1].state == DataState(3, 0, True)


# ---------------------------------------------------------------- sources


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond\n\n\nthird\n")
    assert list(iter_documents(resolve_source(str(tmp_path / "a.txt")))) == [
        "first paragraph\nstill first",
        "second",
        "third",
    ]

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = corpus_rows()
    columns = {k: [r.get(k) for r in rows] for k in ("text", "messages")}
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "c.parquet")
    from_jsonl = list(iter_documents(resolve_source(CORPUS)))
    assert list(iter_documents(resolve_source(str(tmp_path / "c.parquet")))) == from_jsonl
    texts = [d for d in from_jsonl if isinstance(d, str)]
    assert texts == demo_texts() and len(from_jsonl) - len(texts) == 4

    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(2):
        write_jsonl(parts / f"p{i}.jsonl", rows[i * 10 : i * 10 + 10])
    for key in (str(parts / "p*.jsonl"), str(parts)):
        spec = resolve_source(key)
        assert spec.data_files is not None and len(spec.data_files) == 2
        assert list(iter_documents(spec)) == from_jsonl[:20]
    (parts / "x.txt").write_text("mixed")
    with pytest.raises(ConfigError, match="mixed"):
        resolve_source(str(parts))


def test_unknown_key_and_missing_file_are_config_errors():
    with pytest.raises(ConfigError) as e:
        resolve_source("fineweb-typo")
    assert "'fineweb-typo'" in str(e.value) and "edu" in str(e.value) and "smoltalk" in str(e.value)
    assert "registry" in str(e.value)
    with pytest.raises(ConfigError, match="nope.jsonl"):
        resolve_source("/nonexistent/nope.jsonl")
    with pytest.raises(ConfigError, match="registry"):
        resolve_source("edu", registry="/nonexistent/registry.json")


def test_packaged_registry():
    reg = json.loads(resources.files("activault").joinpath("datasets.json").read_text())
    assert set(reg) == {
        "edu",
        "web-instruct",
        "infinity-instruct",
        "lmsys",
        "smoltalk",
        "s1.1",
        "qwq_cot",
    }
    specs = {k: resolve_source(k) for k in reg}
    assert specs["edu"].kind == "text" and specs["edu"].name == "sample-100BT"
    assert all(s.kind == "chat" for k, s in specs.items() if k != "edu")
    assert specs["lmsys"].filters == {"language": "English"}
    assert specs["infinity-instruct"].name == "0625" and specs["infinity-instruct"].messages == "conversations"


def test_custom_registry_columns_templates_and_filters(tmp_path, tok):
    qa = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "q1", "answer": "a1", "lang": "en"},
            {"question": "q2", "answer": None, "lang": "fr"},
        ],
    )
    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {"conversation": [{"role": "user", "content": "hi"}], "language": lang}
            for lang in ("English", "German", "English")
        ],
    )
    registry = {
        "qa": {
            "path": "json",
            "data_files": str(qa),
            "kind": "chat",
            "turns": [["user", "{question}"], ["assistant", "{answer}"]],
        },
        "qa-text": {
            "path": "json",
            "data_files": [str(qa)],
            "kind": "text",
            "template": "Q: {question}\nA: {answer}",
        },
        "en": {
            "path": "json",
            "data_files": str(chats),
            "kind": "chat",
            "messages": "conversation",
            "filters": {"language": "English"},
        },
        "bad": {"path": "json", "colour": "blue"},
    }
    reg = write_jsonl(tmp_path / "reg.json", [])
    reg.write_text(json.dumps(registry))
    docs = list(iter_documents(resolve_source("qa", registry=str(reg))))
    assert docs == [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [{"role": "user", "content": "q2"}],
    ]
    assert list(iter_documents(resolve_source("qa-text", registry=str(reg)))) == ["Q: q1\nA: a1"]
    assert len(list(iter_documents(resolve_source("en", registry=str(reg))))) == 2
    en = resolve_source("en", registry=str(reg))
    assert sum(len(list(iter_documents(en, machine=m, num_runs=2))) for m in range(2)) == 2
    with pytest.raises(ConfigError, match="colour"):
        resolve_source("bad", registry=str(reg))
    batches = list(iter_batches(cfg("qa", registry=str(reg), seq_length=8), tok))
    assert batches[-1].state.exhausted


def test_text_and_messages_fields_name_other_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "own.jsonl", [{"body": "first document"}, {"body": "second one"}])
    assert list(iter_documents(source_for(cfg(str(path), text_field="body")))) == ["first document", "second one"]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": chat}])
    assert list(iter_documents(source_for(cfg(str(path), messages_field="dialog")))) == [chat]


# ---------------------------------------------------------------- hostile text


BAD_LINES = [
    b'\xff\xfe{"text": "latin-1 bytes \xe9t\xe9"}\n',  # not UTF-8
    b'{"text": "unterminated\n',  # not JSON
    b"[1, 2, 3]\n",  # JSON, not an object
    b"\n",  # blank: not a record at all
]


def write_hostile(path: Path, rows: list[dict], every: int = 7) -> tuple[Path, list[str]]:
    """`rows` as JSON lines, a bad line after every `every`-th; returns bad lines' `file:line`."""
    out, where, n = [], [], 0
    for i, r in enumerate(rows):
        out.append(json.dumps(r).encode() + b"\n")
        n += 1
        if i % every == every - 1:
            bad = BAD_LINES[(i // every) % len(BAD_LINES)]
            out.append(bad)
            n += 1
            if bad.strip():
                where.append(f"{path}:{n}")
    path.write_bytes(b"".join(out))
    return path, where


def test_bad_lines_are_skipped_counted_and_named(tmp_path, caplog):
    rows = corpus_rows()[:60]
    path, where = write_hostile(tmp_path / "h.jsonl", rows)
    clean = write_jsonl(tmp_path / "clean.jsonl", rows)
    bad = BadRecords()
    with caplog.at_level(logging.WARNING, logger="activault.collection.sources"):
        docs = list(iter_documents(resolve_source(str(path)), bad=bad))
    assert docs == list(iter_documents(resolve_source(str(clean)))), "every good record, in order"
    assert bad.count == len(where) == 6
    logged = [r.getMessage() for r in caplog.records]
    assert all(any(w + ":" in m for m in logged) for w in where), "each bad record's file and line"
    assert any("not UTF-8" in m for m in logged) and any("not JSON" in m for m in logged)
    assert any("not an object" in m for m in logged)


def test_bad_record_error_names_file_and_line(tmp_path, tok):
    path, where = write_hostile(tmp_path / "h.jsonl", corpus_rows()[:30])
    with pytest.raises(DataError) as e:
        list(iter_batches(cfg(str(path), on_bad_record="error"), tok))
    assert where[0] in str(e.value) and "on_bad_record: skip" in str(e.value)


def test_bad_record_count_is_in_the_resumable_state(tmp_path, tok):
    """The count in each batch's state is the same however the stream was read (resumed or not)."""
    rows = corpus_rows()
    chats = [r for r in rows if "messages" in r]
    path, where = write_hostile(tmp_path / "h.jsonl", rows[:40] + chats, every=5)
    c = cfg(str(path), seq_length=40, batch_size=3, shuffle_buffer=20, seed=3)
    batches = list(iter_batches(c, tok))
    counts = [b.state.bad_records for b in batches]
    assert counts == sorted(counts) and counts[0] < counts[-1] == len(where)
    for i in range(0, len(batches) - 1, 3):
        resumed = list(iter_batches(c, tok, state=batches[i].state))
        assert [b.state for b in resumed] == [b.state for b in batches[i + 1 :]]
        pairs = zip(resumed, batches[i + 1 :], strict=True)
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in pairs)


@pytest.mark.parametrize("files", [1, 2])
def test_each_bad_record_belongs_to_one_machine(tmp_path, tok, files):
    rows = corpus_rows()
    where = []
    for f in range(files):
        where += write_hostile(tmp_path / f"p{f}.jsonl", rows[f::files], every=4)[1]
    c = cfg(str(tmp_path / "p*.jsonl"))
    last = [list(iter_batches(c, tok, machine=m, num_runs=2))[-1] for m in range(2)]
    total = sum(b.state.bad_records for b in last)
    assert total == len(where)


def test_json_array_files(tmp_path):
    rows = corpus_rows()[:5]
    (tmp_path / "a.json").write_text(json.dumps(rows + [7]))
    bad = BadRecords()
    docs = list(iter_documents(resolve_source(str(tmp_path / "a.json")), bad=bad))
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    assert docs == list(iter_documents(resolve_source(str(jsonl))))
    assert bad.count == 1, "an item that is not an object"
    (tmp_path / "b.json").write_text(json.dumps(rows)[:-20])
    bad = BadRecords()
    assert list(iter_documents(resolve_source(str(tmp_path / "b.json")), bad=bad)) == []
    assert bad.count == 1, "a broken array is one bad record: the file"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "has no rows"),
        (b"\n\n", "has no rows"),
        (b'{"body": "x", "id": 1}\n' * 3, "no non-empty string field 'text' or chat field"),
        (b'{"text": ""}\n{"text": "   "}\n', "fields are 'text'"),
        (b"not json\n" * 3, "are bad records (the first: "),
    ],
    ids=["empty", "blank", "wrong-field", "empty-strings", "all-bad"],
)
def test_a_source_without_documents_is_an_error(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        require_documents(resolve_source(str(path)), f"data_key {str(path)!r}")
    assert message in str(e.value) and str(path) in str(e.value)
    if "wrong" in message:
        assert "'body', 'id'" in str(e.value)


def test_require_documents_names_the_registry_field_and_machine(tmp_path):
    rows = write_jsonl(tmp_path / "r.jsonl", [{"question": "q", "answer": "a"}])
    reg = tmp_path / "reg.json"
    entry = {"path": "json", "data_files": str(rows), "kind": "text", "text": "prompt"}
    reg.write_text(json.dumps({"qa": entry}))
    message = "string field 'prompt'; their fields are 'question', 'answer'"
    with pytest.raises(DataError, match=message):
        require_documents(resolve_source("qa", str(reg)), "data_key 'qa'")
    require_documents(resolve_source(CORPUS), "corpus")  # a good source passes
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "only one"}])
    require_documents(resolve_source(str(one)), "one", machine=0, num_runs=2)
    with pytest.raises(DataError, match="for machine 1 of 2: .*lower num_runs"):
        require_documents(resolve_source(str(one)), "one", machine=1, num_runs=2)


@pytest.mark.parametrize(
    "data_key", ["y" * 5000, "/".join(["y" * 200] * 30), "a\x00b"], ids=["long-part", "long-path", "nul"]
)
def test_a_data_key_no_path_can_have_is_one_config_error_naming_the_field(data_key):
    # A part over 255 bytes made Path.is_dir raise a raw OSError (ENAMETOOLONG).
    with pytest.raises(ConfigError) as e:
        resolve_source(data_key)
    text = str(e.value)
    assert text.startswith(f"data_config.data_key {data_key[:80]!r}") and "is neither a key of the dataset" in text
    assert len(text) < 1000, "a long key is shown cut"


LONE = [
    '{"text": "bad \\ud800 here"}',  # a high half alone
    '{"text": "bad \\udc00"}',  # a low half alone
    '{"messages": [{"role": "user", "content": "hi \\uDBFF"}, {"role": "assistant", "content": "yo"}]}',
    '{"text": "fine", "\\ud800": 1}',  # in a key: the row is still no text
]


def test_a_lone_surrogate_is_a_bad_record_named_by_line_not_a_tokenizer_error(tmp_path, tok):
    # The tokenizer raised a raw TypeError for the whole chunk of documents.
    good = [json.dumps({"text": t}) for t in ("first", "emoji \U0001f600 escaped as a pair", "last")]
    lines = [good[0], *LONE, good[1], good[2]]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert "\\ud83d\\ude00" in good[1], "json.dumps escapes the emoji as a surrogate pair"
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    bad = BadRecords()
    docs = list(iter_documents(resolve_source(str(path)), bad=bad))
    assert docs == list(iter_documents(resolve_source(str(clean)))) and bad.count == len(LONE)
    batches = list(iter_batches(cfg(str(path), seq_length=16, batch_size=2), tok))
    expected = list(iter_batches(cfg(str(clean), seq_length=16, batch_size=2), tok))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, expected, strict=True))
    assert batches[-1].state.bad_records == len(LONE)
    with pytest.raises(DataError) as e:
        list(iter_batches(cfg(str(path), on_bad_record="error"), tok))
    assert f"{path}:2: not Unicode text (a lone UTF-16 surrogate '\\ud800'" in str(e.value)


def test_a_lone_surrogate_in_a_json_array_is_a_bad_item(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "ok"}, {"text": "bad \\ud800"}, {"text": "ok too"}]')
    bad = BadRecords()
    assert list(iter_documents(resolve_source(str(path)), bad=bad)) == ["ok", "ok too"] and bad.count == 1
    with pytest.raises(DataError, match=r"a.json: item 1: not Unicode text"):
        list(iter_documents(resolve_source(str(path)), bad=BadRecords("error")))


def test_the_local_probe_reads_json_without_datasets_and_says_what_require_documents_says(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"content": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError) as probed:
        probe_local(resolve_source(str(data)), "src")
    with pytest.raises(DataError) as required:
        require_documents(resolve_source(str(data)), "src")
    assert str(probed.value) == str(required.value) and "their fields are 'content'" in str(probed.value)
    assert probe_local(resolve_source(str(data), text_field="content"), "src") is True
    text = tmp_path / "d.txt"
    text.write_text("a paragraph\n")
    assert probe_local(resolve_source(str(text)), "src") is False  # not JSON: checked when collect starts
