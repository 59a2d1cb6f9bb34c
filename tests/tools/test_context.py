"""tools/context.py: a stored token traced back to its document's text, on a tiny model's run over a
local JSONL corpus; hostile coordinates and files without provenance give one clear message."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from activault.collection.pipeline import collect
from activault.errors import ActivaultError, DataError
from activault.storage.s3 import S3Store
from activault.tools import context as context_mod
from activault.tools.context import token_context
from activault.vault.megabatch import decode, encode, relabelled
from support.collecting import load_hook, make_cfg, run_cli
from support.packing import corpus_rows, write_jsonl
from support.synth import copy_tree, s3_env

HOOK = "models.layers.1.post"


@pytest.fixture(scope="module")
def collected(tiny_model_dir, tmp_path_factory):
    """A run whose data runs out (its last row ends in padding), over a local corpus."""
    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("ctx")
    corpus = write_jsonl(out / "corpus.jsonl", corpus_rows()[:25])
    cfg = make_cfg(model, out / "vault", data={"data_key": str(corpus), "n_batches": 40, "shuffle_buffer": 8})
    collect(cfg, show_progress=False)
    return model, out / "vault" / "run"


def real_tokens(root: Path) -> list[tuple[str, int, int, int]]:
    """(file, row, column, token id) of every real token of the hook."""
    out = []
    for f in sorted((root / HOOK).glob("*.safetensors")):
        mb = decode(f.read_bytes(), f.name)
        for r, c in (mb.documents >= 0).nonzero().tolist():
            out.append((f.name, r, c, int(mb.input_ids[r, c])))
    return out


def test_random_tokens_come_back_with_their_text(collected):
    model, root = collected
    tok = AutoTokenizer.from_pretrained(model)
    tokens = real_tokens(root)
    for name, r, c, tid in random.Random(0).sample(tokens, 25):
        ctx = token_context(str(root), HOOK, name, r, c, window=8)
        assert ctx.token_id == tid and ctx.token == tok.decode([tid])
        assert f"[[{tok.decode([tid])}]]" in ctx.text() and tid in ctx.ids
        assert ctx.tokenizer == str(model.resolve())


def test_cli_prints_the_marked_text_and_json(collected, capsys):
    _, root = collected
    name, r, c, tid = real_tokens(root)[100]
    rc, out, _ = run_cli(["context", str(root), HOOK, name, str(r), str(c)], capsys)
    assert rc == 0 and f"row {r}, column {c}" in out and f"token {tid}" in out and "[[" in out
    short = name.removesuffix(".safetensors")
    rc, out, _ = run_cli(["context", str(root), HOOK, short, str(r), str(c), "--json"], capsys)
    got = json.loads(out)
    assert rc == 0 and got["token_id"] == tid and got["document"] >= 0 and "[[" in got["text"]


def test_without_the_tokenizer_the_stored_ids_are_shown(collected, monkeypatch):
    _, root = collected
    name, r, c, tid = real_tokens(root)[50]
    monkeypatch.setattr(context_mod, "_tokenizer", lambda rec: None)
    ctx = token_context(str(root), HOOK, name, r, c, window=3)
    assert ctx.tokenizer is None and ctx.token == str(tid) and f"[[{tid}]]" in ctx.text()
    row = load_hook(root, HOOK)["input_ids"][int(name[7:13]) * 8 + r].tolist()
    assert ctx.ids == row[max(0, c - len(ctx.before.split())) : c + 1 + len(ctx.after.split())]


def padding(root: Path) -> tuple[str, int, int]:
    last = sorted((root / HOOK).glob("*.safetensors"))[-1]
    mb = decode(last.read_bytes(), last.name)
    r, c = (mb.documents < 0).nonzero()[0].tolist()
    return last.name, r, c


@pytest.mark.parametrize(
    "coords,message",
    [
        (("m00000-000000.safetensors", 99, 0), "row 99 is out of range: m00000-000000.safetensors holds 8 rows of 64"),
        (("m00000-000000.safetensors", 0, -1), "column -1 is out of range"),
        (("m00000-000000.safetensors", -3, 0), "row -3 is out of range"),
        (("m00000-000999.safetensors", 0, 0), "m00000-000999.safetensors does not exist; `activault ls"),
        (("notafile", 0, 0), "'notafile' is not a megabatch name like m00000-000000.safetensors"),
        (("pad", 0, 0), "is padding"),
    ],
)
def test_garbage_coordinates_give_one_clear_message(collected, capsys, coords, message):
    _, root = collected
    name, r, c = padding(root) if coords[0] == "pad" else coords
    with pytest.raises(ActivaultError, match=message):
        token_context(str(root), HOOK, name, r, c)
    rc, out, err = run_cli(["context", str(root), HOOK, name, str(r), str(c)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and out == ""


def test_an_unknown_hook_names_the_hooks(collected):
    _, root = collected
    with pytest.raises(ActivaultError, match="has no hook 'nope'; its hooks: models.layers.1.post"):
        token_context(str(root), "nope", "m00000-000000.safetensors", 0, 0)


def test_a_file_written_before_provenance_says_so(collected, tmp_path):
    _, root = collected
    f = root / HOOK / "m00000-000000.safetensors"
    old = decode(f.read_bytes(), f.name)
    tensors = {k: v for k, v in old.tensors.items() if k != "documents"}
    copy = tmp_path / "run"
    for p in root.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(root)).write_bytes(p.read_bytes())
    kept = {k: v for k, v in old.metadata.items() if not k.startswith("checksum")}
    meta = relabelled({**kept, "format_version": "3"})
    (copy / HOOK / f.name).write_bytes(b"".join(encode(tensors, meta)))
    with pytest.raises(DataError, match="written before provenance \\(format version 3\\)"):
        token_context(str(copy), HOOK, f.name, 0, 0)


def test_a_source_changed_since_collection_is_named(collected, tmp_path):
    _, root = collected
    rec = json.loads((root / "cfg.json").read_text())
    corpus = Path(rec["source"]["data_files"][0])
    copy = tmp_path / "run"
    for p in root.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(root)).write_bytes(p.read_bytes())
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "zz " * 50}] * 40)
    rec["source"]["data_files"] = [str(other)]
    (copy / "cfg.json").write_text(json.dumps(rec))
    name, r, c, _ = real_tokens(root)[10]
    with pytest.raises(DataError, match="changed since the run was collected"):
        token_context(str(copy), HOOK, name, r, c)
    assert corpus.exists()


@pytest.mark.s3
def test_context_of_a_run_on_s3(collected, moto_url, moto_bucket, monkeypatch):
    _, root = collected
    env = s3_env(moto_url)
    copy_tree(root, S3Store(f"s3://{moto_bucket}", env=env), "run")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    name, r, c, tid = real_tokens(root)[7]
    local = token_context(str(root), HOOK, name, r, c)
    remote = token_context(f"s3://{moto_bucket}/run", HOOK, name, r, c)
    assert remote.token_id == tid and remote.text() == local.text()
    assert torch.equal(torch.tensor(remote.ids), torch.tensor(local.ids))
