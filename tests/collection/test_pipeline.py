"""End-to-end collection on the local store: stored data equals the model's, statistics are exact,
runs are deterministic and resume byte-for-byte after SIGKILL."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from activault.collection.packing import encode_document
from activault.collection.pipeline import _report_wait, collect
from activault.collection.resume import FIELDS, check_resume, config_fields
from activault.collection.sources import iter_documents, resolve_source
from activault.config import parse_config
from activault.errors import (
    ConfigError,
    DataError,
    FormatError,
    LockedError,
    StorageError,
)
from activault.storage import LocalStore
from activault.tools.verify import verify_run
from activault.vault.records import REBUILD, RunRecord
from support.collecting import CORPUS, load_hook, make_cfg, run_cli, tree_bytes
from support.killing import kill_after_files


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def collected(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("vault")
    cfg = make_cfg(llama, out)
    result = collect(cfg, show_progress=False)
    return cfg, out / "run", result


def test_layout_and_shapes(collected):
    cfg, root, result = collected
    assert (root / "cfg.json").exists()
    rec = json.loads((root / "cfg.json").read_text())
    assert rec["num_runs"] == 1 and rec["hooks"] == cfg.upload_config.hooks
    # Hooks up to block 1 of 4: the 2 blocks loaded and run (was: 4, the skeleton's).
    assert (rec["model"]["n_layers"], rec["model"]["n_layers_kept"]) == (4, 2)
    names = None
    for hook in cfg.upload_config.hooks:
        meta = json.loads((root / hook / "metadata.json").read_text())
        assert meta["shape"] == [8, 64, 64] and meta["dtype"] == "float32"
        files = sorted(p.name for p in (root / hook).glob("*.safetensors"))
        assert names is None or files == names  # same file names in every hook folder
        names = files
        t = load_hook(root, hook)
        assert t["states"].shape == (24, 64, 64)
        assert t["input_ids"].shape == t["positions"].shape == (24, 64)
    assert names == ["m00000-000000.safetensors", "m00000-000001.safetensors", "m00000-000002.safetensors"]
    a, b = (load_hook(root, h) for h in cfg.upload_config.hooks)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["positions"], b["positions"])


def _documents(tokenizer):
    spec = resolve_source(CORPUS)
    for doc in iter_documents(spec):
        ids, keep = encode_document(doc, tokenizer, clean_added_tokens=True, clean_default_system_prompt=True)
        if any(keep):
            yield ids, keep


def assert_states_equal_model(root: Path, model_dir: Path, hook: str, layer: int, S: int) -> int:
    """Each stored residual equals the block's output for its piece of document run alone (a document
    split across rows continues in the next row, with its context starting there). Returns pieces checked."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    cls = AutoModel if "bert" in str(model_dir) else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    stored = load_hook(root, hook)
    docs = _documents(tok)
    doc_ids: list[int] = []
    kept: list[int] = []
    j, checked = 0, 0
    for r in range(stored["positions"].shape[0]):
        pos, ids, states = stored["positions"][r], stored["input_ids"][r], stored["states"][r]
        t = 0
        while t < S and pos[t] >= 0:
            if j == len(kept):
                doc_ids, keep = next(docs)
                kept, j = [p for p, k in enumerate(keep) if k], 0
            n = 0
            while t + n < S and j + n < len(kept) and pos[t + n] == kept[j + n]:
                n += 1
            assert n > 0, f"row {r} token {t}: position {int(pos[t])} does not continue the document"
            want_ids = torch.tensor([doc_ids[p] for p in kept[j : j + n]], dtype=torch.int32)
            assert torch.equal(ids[t : t + n], want_ids)
            start = 0 if j == 0 else kept[j]
            with torch.no_grad():
                inp = torch.tensor([doc_ids[start : kept[j + n - 1] + 1]])
                hs = model(inp, output_hidden_states=True).hidden_states[layer + 1][0]
            want = hs[[p - start for p in kept[j : j + n]]]
            assert (states[t : t + n] - want).abs().max() < 1e-4, (r, t)
            checked += 1
            j, t = j + n, t + n
    return checked


def test_stored_states_equal_model_on_each_document_alone(collected, llama):
    """Invariants 1 and 2 on the stored files: packed, cleaned, split documents all match."""
    cfg, root, _ = collected
    assert assert_states_equal_model(root, llama, "models.layers.1.post", 1, cfg.data_config.seq_length) >= 10


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_store_what_the_model_computes(tiny_model_dir, tmp_path, arch):
    model = tiny_model_dir(arch)
    cfg = make_cfg(model, tmp_path, data={"n_batches": 4})
    collect(cfg, show_progress=False)
    assert assert_states_equal_model(tmp_path / "run", model, "models.layers.1.post", 1, 64) >= 5


def test_statistics_equal_numpy_float64(collected):
    cfg, root, _ = collected
    for hook in cfg.upload_config.hooks:
        t = load_hook(root, hook)
        real = t["positions"].reshape(-1) >= 0
        x = t["states"].reshape(-1, t["states"].shape[-1])[real].double().numpy()
        st = json.loads((root / hook / "statistics.json").read_text())
        assert st["count"] == len(x)
        np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st["std"], x.std(0), rtol=1e-6)
        np.testing.assert_allclose(st["norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-6)
        assert st["machines"] == [0]


def test_cleaning_removes_special_tokens(collected, llama):
    _, root, _ = collected
    tok = AutoTokenizer.from_pretrained(llama)
    ids = load_hook(root, "models.layers.1.post")["input_ids"]
    assert not set(ids.unique().tolist()) & set(tok.all_special_ids)


def test_same_config_gives_byte_identical_files(collected, llama, tmp_path):
    cfg, root, _ = collected
    collect(make_cfg(llama, tmp_path), show_progress=False)
    assert tree_bytes(tmp_path / "run") == tree_bytes(root)


def test_a_store_slower_than_the_model_is_waited_for_measured_and_named(
    collected, llama, tmp_path, monkeypatch, caplog
):
    """Storage slower than the model: the model waits for a buffer (memory stays bounded), the
    wait is measured and the warning names what helps; the files are the same bytes."""
    _, root, _ = collected
    put = LocalStore.put

    def slow_put(self, key, data):
        if key.endswith(".safetensors"):
            time.sleep(0.3)
        put(self, key, data)

    monkeypatch.setattr(LocalStore, "put", slow_put)
    cfg = make_cfg(llama, tmp_path, upload={"max_pending": 1, "write_threads": 1})
    with caplog.at_level(logging.INFO, logger="activault.collection.pipeline"):
        r = collect(cfg, show_progress=False)
    # Megabatch 2 of a hook needs the buffer of its file 0, still being written (0.3 s): a wait
    # (how long depends on how fast the model ran meanwhile, so no bound on it here).
    assert 0 < r.storage_wait < r.seconds
    said = [m.getMessage() for m in caplog.records if "waited" in m.getMessage()]
    assert len(said) == 1 and f"waited {r.storage_wait:.1f} s" in said[0] and "for storage" in said[0]
    # Whether that is a warning depends on its share of the run, i.e. on how fast the model ran here:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="activault.collection.pipeline"):
        _report_wait(10.0, 100.0, cfg)  # 10%: a warning naming what helps
        _report_wait(1.0, 100.0, cfg)  # 1%: said, not warned
    (warned, told) = caplog.records
    assert warned.levelno == logging.WARNING and "upload_config.write_threads (now 1)" in warned.getMessage()
    assert told.levelno == logging.INFO and "waited 1.0 s" in told.getMessage()
    assert {k: v for k, v in tree_bytes(tmp_path / "run").items() if k.endswith(".safetensors")} == {
        k: v for k, v in tree_bytes(root).items() if k.endswith(".safetensors")
    }


_CHURN = """
import resource
import numpy as np
from activault.collection.model import keep_freed_memory

def faults_per_round() -> int:  # a CPU forward's pattern: many blocks allocated, then freed together
    xs = [np.ones(15 << 10) for _ in range(1000)]  # 1000 x 120 KiB
    del xs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        xs = [np.ones(15 << 10) for _ in range(1000)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_per_round()
kept = keep_freed_memory()
print(default, kept, faults_per_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc")
def test_freed_memory_is_kept_so_the_next_batch_faults_no_page_in(llama, tmp_path, monkeypatch):
    # Page faults, not time: by default glibc hands the freed heap back and every page faults in again.
    out = subprocess.run([sys.executable, "-c", _CHURN], capture_output=True, text=True, check=True)
    default, kept, after = out.stdout.split()
    assert kept == "True"
    # A round touches 3 x 1000 x 120 KiB = 90,000 pages; kept memory faults in under 1% of them. How
    # many the default faults depends on the Python build's allocator (36,564 to over 50,000 seen).
    touched = 3 * 1000 * (120 << 10) // 4096
    assert int(after) < touched // 100 and int(after) < int(default), out.stdout
    calls = []
    monkeypatch.setattr("activault.collection.model.keep_freed_memory", lambda: calls.append(1) or True)
    collect(make_cfg(llama, tmp_path, data={"n_batches": 2}), show_progress=False)
    assert calls == [1]  # a CPU collection sets it before its model loads


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "activault", *args], capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    over = {"data": {"n_batches": 24, "seq_length": 128, "batch_size": 8}, "upload": {"batches_per_upload": 1}}
    ref = make_cfg(model, tmp_path / "ref", **over)
    collect(ref, show_progress=False)
    want = tree_bytes(tmp_path / "ref/run")

    killed = make_cfg(model, tmp_path / "killed", **over)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(killed.model_dump(mode="json")))
    progress = tmp_path / "killed/run/progress/machine-00000.json"
    kills = kill_after_files(path, progress, (2, 5, 9, 14))  # kill after this many files, then resume
    assert kills >= 2, "the run finished before it could be killed; make it longer"
    done = _cli("collect", "--config", str(path), "--quiet")
    assert done.returncode == 0, done.stderr
    got = tree_bytes(tmp_path / "killed/run")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


# ---- records rebuilt from what is stored, without collecting again ----


def copy_run(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest / "run")
    return dest / "run"


def megabatch_mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*.safetensors"))}


def test_rerunning_collect_rebuilds_every_damaged_record_without_collecting(collected, llama, tmp_path):
    cfg, root, _ = collected
    run = copy_run(root, tmp_path)
    h0, h1 = cfg.upload_config.hooks
    (run / "cfg.json").unlink()
    (run / h0 / "metadata.json").write_text('{"format": "activault", "dtype": ')
    meta = json.loads((run / h1 / "metadata.json").read_text())
    meta["dtype"] = "bfloat16"  # parses, but contradicts every file
    (run / h1 / "metadata.json").write_text(json.dumps(meta))
    (run / h0 / "statistics.json").unlink()
    (run / h1 / "statistics.json").write_text('{"count": 0}')
    problems = verify_run(LocalStore(tmp_path), "run").problems
    assert len(problems) == 5 and all(REBUILD in p for p in problems), problems
    assert any(p.startswith(f"{h1}/metadata.json says") and "not the files" in p for p in problems)
    before = megabatch_mtimes(run)

    collect(make_cfg(llama, tmp_path), show_progress=False)  # what the advice says
    assert tree_bytes(run) == tree_bytes(root)  # every record as first written
    assert megabatch_mtimes(run) == before  # and nothing collected again
    assert verify_run(LocalStore(tmp_path), "run").problems == []


def test_a_damaged_progress_record_names_a_repair_that_works(collected, llama, tmp_path):
    _, root, _ = collected
    run = copy_run(root, tmp_path)
    (run / "progress/machine-00000.json").write_text('{"machine": 0, "num_runs": 1, "files_done": "3"}')
    (problem,) = verify_run(LocalStore(tmp_path), "run").problems
    with pytest.raises(FormatError, match="field 'files_done'.*delete .*machine-00000.json and rerun machine 0") as e:
        collect(make_cfg(llama, tmp_path), show_progress=False)
    assert str(e.value) == problem  # collect and verify give the same advice
    (run / "progress/machine-00000.json").unlink()
    collect(make_cfg(llama, tmp_path), show_progress=False)
    assert tree_bytes(run) == tree_bytes(root)


def test_a_damaged_data_cursor_is_refused_before_weights_load(collected, llama, tmp_path, monkeypatch):
    """A progress record whose data_state says exhausted "false" would resume as finished and collect
    nothing; it is refused, naming the record and a repair that gives the same bytes back."""
    from activault.collection import model

    _, root, _ = collected
    run = copy_run(root, tmp_path)
    key = run / "progress/machine-00000.json"
    rec = json.loads(key.read_text())
    rec.update(finished=False, files_done=1, data_state={**rec["data_state"], "exhausted": "false"})
    key.write_text(json.dumps(rec))
    loaded = []
    monkeypatch.setattr(model, "load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(FormatError, match="machine-00000.json: data_state field 'exhausted'.*rerun machine 0"):
        collect(make_cfg(llama, tmp_path), show_progress=False)
    assert not loaded
    monkeypatch.undo()
    key.unlink()
    collect(make_cfg(llama, tmp_path), show_progress=False)
    assert tree_bytes(run) == tree_bytes(root)


def test_a_progress_record_counting_more_files_than_planned_is_refused(collected, llama, tmp_path, monkeypatch, capsys):
    """A record saying 99 files of a 3-file share was reported as written and left so; it is refused,
    by collect and by repair alike, before weights load, naming the record and the fix."""
    from activault.collection import model

    _, root, _ = collected
    run = copy_run(root, tmp_path)
    key = run / "progress/machine-00000.json"
    key.write_text(key.read_text().replace('"files_done": 3', '"files_done": 99'))
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_cfg(llama, tmp_path).model_dump(mode="json")))
    for repair in ([], ["--repair"]):
        rc, _, err = run_cli(["collect", "--config", str(path), "--quiet", *repair], capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{key}: field 'files_done' is 99, more than the 3 file(s) machine 0 is planned to write" in err
        assert f"the record is damaged; delete {key} and rerun machine 0's collect command" in err
    monkeypatch.undo()
    key.unlink()  # what the message says, the config being the run's
    collect(make_cfg(llama, tmp_path), show_progress=False)
    assert tree_bytes(run) == tree_bytes(root)


BAD = [
    ({"run_name": "x", "bogus": 1}, "bogus: unknown key"),
    ({"data_config": {"seq_length": -1}}, "data_config.seq_length"),
    ({"data_config": {"batch_size": "many"}}, "data_config.batch_size"),
    (
        {"transformer_config": {"dtype": "float8"}},
        "unknown dtype 'float8'; use one of float32, float16, bfloat16, auto",
    ),
    ({"upload_config": {"hooks": []}}, "upload_config.hooks"),
    ({"transformer_config": {"max_per_device_memory": "lots"}}, "is not a memory size"),
    ({"num_runs": 4, "data_config": {"n_batches": 2}}, "less than num_runs"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_config_gives_one_clear_message(llama, tmp_path, change, message):
    raw = make_cfg(llama, tmp_path).model_dump(mode="json")
    for k, v in change.items():
        if isinstance(v, dict):
            raw[k].update(v)
        else:
            raw[k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = _cli("collect", "--config", str(path))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "hook,message",
    [
        ("models.layers.1.mlpx.post", "models.layers.3.mlp.post"),  # a valid example is offered
        ("model.layers.1.nonexistent.pre", "Valid forms"),
        ("models.layers.99.mlp.post", "the model has 4 layers (0..3, or -1 for the last)"),
    ],
)
def test_unknown_hook_lists_valid_names_before_loading_weights(llama, tmp_path, hook, message):
    cfg = make_cfg(llama, tmp_path, upload={"hooks": [hook]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = _cli("collect", "--config", str(path))
    assert out.returncode == 2 and hook in out.stderr and message in out.stderr
    assert "Loading weights" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["collect", "--config", "/nonexistent.yaml"], "does not exist"),
        (["collect", "--config", "{cfg}", "--machine", "3"], "--machine 3 is out of range"),
        (["collect", "--config", "{cfg}", "--storage", "ftp://x/y"], "unsupported storage scheme"),
    ],
)
def test_bad_invocation_messages(llama, tmp_path, args, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_cfg(llama, tmp_path).model_dump(mode="json")))
    out = _cli(*[a.format(cfg=path) for a in args])
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "over,message",
    [
        ({"data": {"seq_length": 4096}}, "exceeds the model's max_position_embeddings (2048)"),
        ({"data": {"seq_length": 2048, "batch_size": 4096}}, "lower upload_config.batches_per_upload"),
    ],
)
def test_sizes_this_machine_or_model_cannot_run_are_refused_before_weights_load(llama, tmp_path, over, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_cfg(llama, tmp_path, **over).model_dump(mode="json")))
    out = _cli("collect", "--config", str(path))
    assert out.returncode == 2 and message in out.stderr
    assert "Loading weights" not in out.stderr and "Traceback" not in out.stderr


def test_bad_data_key(llama, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(make_cfg(llama, tmp_path, data={"data_key": "no-such-dataset"}).model_dump(mode="json"))
    )
    out = _cli("collect", "--config", str(path))
    assert out.returncode == 2 and "no-such-dataset" in out.stderr and "edu" in out.stderr


def test_shipped_configs_are_valid():
    for p in sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml")):
        parse_config(yaml.safe_load(p.read_text()), str(p))


def test_configs_readme_documents_every_field():
    from activault.config import Config, DataConfig, TransformerConfig, UploadConfig

    text = Path(__file__).resolve().parents[2].joinpath("configs/README.md").read_text()
    for cls in (Config, TransformerConfig, DataConfig, UploadConfig):
        for name, f in cls.model_fields.items():
            assert f"`{name}`" in text, name
            assert f.description, f"{cls.__name__}.{name} has no docstring"


def test_demo_runs_and_runs_again(tmp_path):
    first = _cli("demo", "--storage", "vault", timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "states" in first.stdout and "row 0 holds" in first.stdout
    assert (tmp_path / "vault/demo/models.layers.1.post/statistics.json").exists()
    again = _cli("demo", "--storage", str(tmp_path / "vault"), timeout=300)  # the same store, spelled otherwise
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr and "12,288 tokens" in again.stdout


# ---------------------------------------------------------------- resuming safely


def test_every_config_field_is_classified_for_resume():
    assert sorted(FIELDS) == sorted(config_fields()), "classify it in collection/resume.py"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_runs": 3}, "num_runs: stored 2, this config 3"),
        ({"hooks": ["b"]}, "upload_config.hooks: stored ['a'], this config ['b']"),
        ({"tokenizer": "/elsewhere/m"}, "tokenizer (transformer_config.model_name, resolved): stored '/m'"),
        ({"model": {"d_model": 9}}, "model.d_model (read from the checkpoint): stored 8, this config 9"),
    ],
    ids=["num_runs", "hooks", "tokenizer", "model"],
)
def test_a_cfg_without_its_config_still_refuses_another_run(change, message):
    """The one list (resume.py) also covers a cfg.json that holds no config (an import's, an older
    one's): its own num_runs and hooks, the tokenizer and the model's facts are compared."""
    stored = RunRecord(run_name="r", hooks=["a"], num_runs=2, tokenizer="/m", model={"d_model": 8})
    check_resume(stored, stored, "here")
    with pytest.raises(ConfigError) as e:
        check_resume(stored, stored.model_copy(update=change), "here")
    assert message in str(e.value) and "new run_name" in str(e.value)


def changed(cfg, path: str, value):
    """A copy of `cfg` with the field at dotted `path` set to `value` (validated)."""
    raw = cfg.model_dump(mode="json")
    node = raw
    *sections, leaf = path.split(".")
    for s in sections:
        node = node[s]
    node[leaf] = value
    return parse_config(raw)


DATA_CHANGES = [
    ("transformer_config.dtype", "bfloat16"),
    ("upload_config.batches_per_upload", 3),
    ("upload_config.hooks", ["models.layers.1.post"]),
    ("data_config.seq_length", 32),
    ("data_config.batch_size", 2),
    ("data_config.seed", 7),
    ("data_config.clean_added_tokens", False),
    ("data_config.shuffle_buffer", 8),
    ("data_config.start_batch", 1),
    ("data_config.n_batches", 8),
    ("num_runs", 2),
    ("transformer_config.kwargs", {"trust_remote_code": True}),
]


@pytest.mark.parametrize("path,value", DATA_CHANGES, ids=[p for p, _ in DATA_CHANGES])
def test_resuming_with_a_field_that_shapes_the_data_is_refused(collected, path, value):
    cfg, root, _ = collected
    before = tree_bytes(root)
    old = cfg.model_dump(mode="json")
    for part in path.split("."):
        old = old[part]
    with pytest.raises(ConfigError) as e:
        collect(changed(cfg, path, value), show_progress=False)
    msg = str(e.value)
    assert f"{path}: stored {old!r}, this config {value!r}" in msg
    assert "restore the stored value" in msg and "new run_name" in msg
    assert tree_bytes(root) == before, "nothing written"


def test_another_data_source_or_model_is_refused(collected, tiny_model_dir, tmp_path):
    cfg, root, _ = collected
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(Path(CORPUS).read_bytes())
    message = r"data_config\.data_key: stored '.*demo_corpus.jsonl', this config '.*copy.jsonl'"
    with pytest.raises(ConfigError, match=message):
        collect(changed(cfg, "data_config.data_key", str(copy)), show_progress=False)
    gpt2 = str(tiny_model_dir("gpt2"))
    with pytest.raises(ConfigError) as e:
        collect(changed(cfg, "transformer_config.model_name", gpt2), show_progress=False)
    assert "transformer_config.model_name" in str(e.value) and "model.architecture" in str(e.value)


RUNTIME_CHANGES = [
    ("upload_config.write_threads", 1),
    ("upload_config.max_pending", 3),
    ("upload_config.price_per_gb_month", 0.1),
    ("upload_config.lease_seconds", 30),
    ("transformer_config.attn_implementation", "eager"),
    ("transformer_config.device", "auto"),
    ("data_config.on_bad_record", "error"),
]


def test_changes_that_store_nothing_different_are_allowed(collected):
    cfg, root, result = collected
    before = tree_bytes(root)
    for path, value in RUNTIME_CHANGES:
        again = collect(changed(cfg, path, value), show_progress=False)
        assert again.files == result.files
    again = collect(changed(cfg, "storage", str(root.parent) + "/./"), show_progress=False)
    assert again.files == result.files and tree_bytes(root) == before


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "has no rows"),
        (b'{"body": "x"}\n' * 5, "their fields are 'body'"),
        (b'{"text": ""}\n' * 5, "no non-empty"),
    ],
    ids=["empty-file", "wrong-field", "empty-strings"],
)
def test_a_source_without_documents_fails_before_weights_load(llama, tmp_path, monkeypatch, content, message):
    import activault.collection.model as model_module

    def no_weights(*a, **k):
        raise AssertionError("weights loaded for a source without documents")

    monkeypatch.setattr(model_module, "load_model", no_weights)
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    with pytest.raises(DataError) as e:
        collect(make_cfg(llama, tmp_path / "vault", data={"data_key": str(data)}), show_progress=False)
    assert message in str(e.value) and str(data) in str(e.value)
    assert not (tmp_path / "vault/run").exists(), "nothing written, no empty run folder left"


def test_bad_record_error_stops_the_run_naming_file_and_line(llama, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(Path(CORPUS).read_bytes() + b'{"text": "cut\n')
    data_over = {"data_key": str(data), "n_batches": 10_000, "on_bad_record": "error"}
    cfg = make_cfg(llama, tmp_path, data=data_over)
    with pytest.raises(DataError, match=f"bad record at {data}:297: not JSON"):
        collect(cfg, show_progress=False)
    skip = changed(cfg, "data_config.on_bad_record", "skip")
    done = collect(skip, show_progress=False)  # resumes after the files written before the error
    assert done.bad_records == 1


def test_filesystem_turning_read_only_is_one_message_then_resume_is_identical(collected, llama, tmp_path, monkeypatch):
    _, ref, _ = collected
    real_replace, real_unlink = os.replace, Path.unlink
    state = {"files": 0, "read_only": False}

    def erofs(path) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def replace(src, dst, *a, **k):
        if str(tmp_path) in str(dst):
            if str(dst).endswith(".safetensors"):
                state["files"] += 1
                state["read_only"] |= state["files"] > 3
            if state["read_only"]:
                raise erofs(dst)
        return real_replace(src, dst, *a, **k)

    def unlink(self, missing_ok=False):
        if state["read_only"] and str(tmp_path) in str(self):
            raise erofs(self)
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    cfg = make_cfg(llama, tmp_path)
    for _ in range(2):  # mid-run, then again while it is still read-only
        with pytest.raises(StorageError) as e:
            collect(cfg, show_progress=False)
        assert "Read-only file system" in str(e.value)
        assert "run the same command again" in str(e.value)
    assert list((tmp_path / "run").rglob(".*.tmp")), "the failed write's temp file stayed"
    state["read_only"], state["files"] = False, -(10**6)
    collect(cfg, show_progress=False)
    got = tree_bytes(tmp_path / "run")
    # This machine's own leftovers are cleared; a temp file of a record every machine writes
    # (cfg.json here) is not, since another machine may be writing it: it stays hidden.
    hidden = sorted(k for k in got if Path(k).name.startswith("."))
    shared = (".cfg.json.", ".metadata.json.", ".statistics.json.")
    assert all(Path(k).name.startswith(shared) for k in hidden)
    assert {k: v for k, v in got.items() if k not in hidden} == tree_bytes(ref)


def test_a_collector_that_lost_its_lock_writes_nothing_over_the_new_holders_run(
    collected, llama, tmp_path, monkeypatch
):
    """Issue 28: while this collector's second record is in flight (it was partitioned past its
    lease), another collector takes the machine over and finishes it. The late record is refused,
    the run stops with LockedError, and the other's run stands byte for byte, finished."""
    _, ref, _ = collected
    real_put, real_swap, records = LocalStore.put, LocalStore.swap, []

    def landing(key):
        if key.endswith("progress/machine-00000.json"):
            records.append(key)
            if len(records) == 2:  # the other collector's whole run lands first
                shutil.copytree(ref, tmp_path / "run", dirs_exist_ok=True)

    def put(self, key, data):
        landing(key)
        real_put(self, key, data)

    def swap(self, key, data, expect):
        landing(key)
        return real_swap(self, key, data, expect)

    monkeypatch.setattr(LocalStore, "put", put)
    monkeypatch.setattr(LocalStore, "swap", swap)
    with pytest.raises(LockedError, match=r"run 'run' machine 0 was taken over: .* counts 3 files, finished"):
        collect(make_cfg(llama, tmp_path), show_progress=False)
    assert tree_bytes(tmp_path / "run") == tree_bytes(ref)
    checked = verify_run(LocalStore(tmp_path), "run")
    assert not checked.problems and not [n for n in checked.notes if "has not finished" in n]


def hostile_copy(path: Path, every: int = 9, first: int = 120) -> Path:
    """The demo corpus with a bad line (not UTF-8, not JSON, not an object) after every
    `every`-th of its `first` rows."""
    bad = [b'\xff{"text": "x"}\n', b'{"text": "cut\n', b"[1, 2]\n"]
    lines = Path(CORPUS).read_bytes().splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i < first and i % every == every - 1:
            out.append(bad[(i // every) % len(bad)])
    path.write_bytes(b"".join(out))
    return path


@pytest.mark.slow
def test_killed_run_admits_one_collector_refuses_a_changed_config_resumes_identically(tiny_model_dir, tmp_path):
    """With bad records in the data: killed after its first file, the run refuses a second
    collector while it lives and a changed dtype after, then resumes to the same bytes."""
    model = tiny_model_dir("llama")
    data = hostile_copy(tmp_path / "hostile.jsonl")
    over = {
        "data": {"data_key": str(data), "n_batches": 24, "seq_length": 128, "batch_size": 8},
        "upload": {"batches_per_upload": 1},
    }
    ref = collect(make_cfg(model, tmp_path / "ref", **over), show_progress=False)
    assert ref.bad_records > 0
    record = json.loads((tmp_path / "ref/run/progress/machine-00000.json").read_text())
    assert record["data_state"]["bad_records"] == ref.bad_records

    cfg = make_cfg(model, tmp_path / "killed", **over)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    progress = tmp_path / "killed/run/progress/machine-00000.json"
    command = [sys.executable, "-m", "activault", "collect", "--config", str(path), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["files_done"] >= 1:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)  # alive and holding its machine, after its first file
        assert proc.poll() is None, "the run ended before it could be stopped"
        with pytest.raises(LockedError) as e:
            collect(cfg, show_progress=False)
        assert f"pid {proc.pid}" in str(e.value) and "running since" in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    message = "transformer_config.dtype: stored 'float32', this config 'bfloat16'"
    with pytest.raises(ConfigError, match=message):
        collect(changed(cfg, "transformer_config.dtype", "bfloat16"), show_progress=False)
    done = collect(cfg, show_progress=False)
    assert done.bad_records == ref.bad_records
    assert tree_bytes(tmp_path / "killed/run") == tree_bytes(tmp_path / "ref/run")


# ---- n_batches: all, until the data runs out ----

ALL = {"data": {"n_batches": "all", "seq_length": 128, "batch_size": 8}, "upload": {"batches_per_upload": 1}}


def test_n_batches_all_collects_until_the_data_runs_out_and_finishes(llama, tmp_path, caplog):
    """The same files as a made-up n_batches larger than the data, a finished record with the
    exhausted cursor, and a summary that plans from the data's size (was: 1000 made-up batches)."""
    counted = make_cfg(llama, tmp_path / "counted", data={**ALL["data"], "n_batches": 10_000}, upload=ALL["upload"])
    collect(counted, show_progress=False)
    caplog.clear()  # the summary above is logged too where an earlier test left INFO on
    with caplog.at_level(logging.INFO, logger="activault.collection.pipeline"):
        r = collect(make_cfg(llama, tmp_path / "all", **ALL), show_progress=False)
    want, got = tree_bytes(tmp_path / "counted/run"), tree_bytes(tmp_path / "all/run")
    assert sorted(got) == sorted(want) and [k for k in want if k != "cfg.json" and got[k] != want[k]] == []
    progress = json.loads((tmp_path / "all/run/progress/machine-00000.json").read_text())
    assert progress["finished"] and progress["data_state"]["exhausted"] and progress["files_done"] == r.files > 1
    messages = [rec.getMessage() for rec in caplog.records]
    tokens = next(m for m in messages if m.startswith("tokens"))
    assert tokens.startswith("tokens       at most ") and "until the data runs out" in tokens
    assert int(tokens.split()[3].replace(",", "")) >= r.tokens  # a bound that holds
    assert messages[-1] == (
        f"machine 0: {r.files} files written; the data ran out (n_batches: all: every document was collected)"
    )
    assert verify_run(LocalStore(tmp_path / "all"), "run", deep=True).problems == []


def test_n_batches_all_on_two_machines_stores_every_document_once(llama, tmp_path):
    """Machines split documents as ever: together they store exactly one machine's tokens."""

    def real_ids(root: Path) -> list[int]:
        t = load_hook(root, "models.layers.1.post")
        return sorted(t["input_ids"][t["positions"] >= 0].tolist())

    collect(make_cfg(llama, tmp_path / "one", **ALL), show_progress=False)
    two = make_cfg(llama, tmp_path / "two", num_runs=2, **ALL)
    for m in range(2):
        collect(two, machine=m, show_progress=False)
    assert real_ids(tmp_path / "two/run") == real_ids(tmp_path / "one/run")


@pytest.mark.slow
def test_n_batches_all_resumes_after_sigkill_byte_identical(llama, tmp_path):
    collect(make_cfg(llama, tmp_path / "ref", **ALL), show_progress=False)
    want = tree_bytes(tmp_path / "ref/run")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(make_cfg(llama, tmp_path / "killed", **ALL).model_dump(mode="json")))
    progress = tmp_path / "killed/run/progress/machine-00000.json"
    assert kill_after_files(path, progress, (2, 5, 9)) >= 2, "the run finished before it could be killed"
    done = _cli("collect", "--config", str(path), "--quiet")
    assert done.returncode == 0, done.stderr
    got = tree_bytes(tmp_path / "killed/run")
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []
    assert json.loads(progress.read_text())["finished"]
