"""collection/preflight.py: the checks estimate and collect share refuse the same garbage with the same
message, all at once, before weights load; the shape from config.json alone equals the skeleton's;
free space; device and weight lines; estimate imports no torch."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections import namedtuple
from importlib import resources
from pathlib import Path

import pytest

from activault.collection import model as model_mod
from activault.collection import preflight as pf
from activault.collection.model import load_skeleton
from activault.collection.pipeline import collect
from activault.config import parse_config
from activault.errors import ActivaultError, ConfigError, DataError, StorageError
from activault.storage import open_store
from activault.vault.records import file_name

CORPUS = str(resources.files("activault").joinpath("demo_corpus.jsonl"))
SHIPPED = sorted(p.stem.replace("--", "/") for p in resources.files("activault").joinpath("model_configs").iterdir())


def make_cfg(model: Path | str, storage: str, data: dict | None = None, **upload):
    return parse_config(
        {
            "run_name": "r",
            "storage": storage,
            "transformer_config": {"model_name": str(model), "dtype": "float32", "device": "cpu"},
            "data_config": {"data_key": CORPUS, "n_batches": 4, "seq_length": 32, "batch_size": 2, **(data or {})},
            "upload_config": {"batches_per_upload": 2, "hooks": ["models.layers.1.post"], **upload},
        }
    )


def refused(which: str, cfg, monkeypatch) -> ActivaultError:
    """The error estimate or collect gives; collect must not load weights."""

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the preflight refused")

    monkeypatch.setattr(model_mod, "load_model", no_weights)
    with pytest.raises(ActivaultError) as e:
        if which == "estimate":
            pf.estimate_lines(cfg)
        else:
            collect(cfg, show_progress=False)
    return e.value


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny llama that reads at most 512 positions."""
    path = tmp_path_factory.mktemp("short") / "llama"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    return path


BOTH = pytest.mark.parametrize("which", ["estimate", "collect"])


# ---- garbage refused at estimate and at collect, with the same message ----


@BOTH
def test_a_data_key_that_does_not_exist(which, tiny_model_dir, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_model_dir("llama"), str(tmp_path / "v"), {"data_key": str(tmp_path / "nope.jsonl")})
    e = refused(which, cfg, monkeypatch)
    assert (
        isinstance(e, ConfigError) and "nope.jsonl" in str(e) and "is neither a key of the dataset registry" in str(e)
    )


@BOTH
def test_a_jsonl_whose_text_field_is_content(which, tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"content": f"document {i}"}) + "\n" for i in range(3)))
    e = refused(which, make_cfg(tiny_model_dir("llama"), str(tmp_path / "v"), {"data_key": str(data)}), monkeypatch)
    assert isinstance(e, DataError)
    assert "yields no documents" in str(e) and "their fields are 'content'" in str(e)
    assert "data_config.text_field" in str(e)


@BOTH
def test_rows_longer_than_the_model_reads(which, short_llama, tmp_path, monkeypatch):
    e = refused(which, make_cfg(short_llama, str(tmp_path / "v"), {"seq_length": 1024}), monkeypatch)
    assert "data_config.seq_length=1024 exceeds the model's max_position_embeddings (512)" in str(e)


@BOTH
def test_every_problem_is_reported_at_once(which, tiny_model_dir, tmp_path, monkeypatch):
    hooks = ["models.layers.9.post", "models.layers.1.post", "models.layers.-7.mlp.pre"]
    cfg = make_cfg(
        tiny_model_dir("llama"), str(tmp_path / "v"), {"data_key": "no-such-key", "seq_length": 4096}, hooks=hooks
    )
    msg = str(refused(which, cfg, monkeypatch))
    assert msg.startswith("4 problems, found before any weights load:")
    assert "hook 'models.layers.9.post': layer 9 out of range, the model has 4 layers" in msg
    assert "hook 'models.layers.-7.mlp.pre': layer -7 out of range" in msg
    assert "'no-such-key' is neither a key" in msg and "exceeds the model's max_position_embeddings" in msg


@BOTH
def test_no_free_space_for_the_plan(which, tiny_model_dir, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    e = refused(which, make_cfg(tiny_model_dir("llama"), str(tmp_path / "v")), monkeypatch)
    assert isinstance(e, StorageError)
    assert f"the local store {tmp_path / 'v'} has 1.0 MB free, but machine 0 needs ~" in str(e)
    assert "free space on that disk, choose another --storage" in str(e)


# ---- free space ----


def test_free_space_counts_files_already_written_and_reads_the_real_disk(tiny_model_dir, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_model_dir("llama"), str(tmp_path / "v"))
    store = open_store(str(tmp_path / "v"))
    shape = pf.model_shape(cfg.transformer_config, cfg.upload_config.hooks)
    plan = pf.make_plan(cfg, shape.dims, shape.itemsize, 0, shape.dtype)
    assert pf.space_check(cfg, plan, store, 0) == (None, None)  # the real disk has room for KBs
    assert pf.free_bytes(tmp_path / "v" / "not" / "made") == shutil.disk_usage(tmp_path).free
    usage = namedtuple("usage", "total used free")
    free = round(plan.total_bytes * pf.SPACE_MARGIN) + pf.SPACE_SLACK - 1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, free))
    problem, _ = pf.space_check(cfg, plan, store, 0)
    assert problem is not None
    store.put(f"r/models.layers.1.post/{file_name(0, 0)}", b"x" * 100)  # a resumed machine's file
    store.put(f"r/models.layers.1.post/{file_name(1, 0)}", b"x" * 100_000)  # another machine's: not counted
    assert pf.space_check(cfg, plan, store, 0) == (None, None)
    assert file_name(3, 7).startswith(pf.machine_prefix(3))


def test_free_space_on_s3_is_a_note(tiny_model_dir, tmp_path, moto_url, moto_bucket, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_url)
    cfg = make_cfg(tiny_model_dir("llama"), f"s3://{moto_bucket}")
    lines = pf.estimate_lines(cfg)
    assert any(line.startswith(f"note: free space at s3://{moto_bucket} cannot be known") for line in lines)


# ---- the shape from config.json equals the skeleton's ----


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_config_shape_equals_the_skeleton_for_tiny_models(arch, tiny_model_dir):
    tc = make_cfg(tiny_model_dir(arch), "/v").transformer_config
    if arch == "gemma2":  # refused with sdpa by the skeleton: so is it without one
        assert pf.config_shape(tc, ["models.layers.1.post"]) is None
        tc = tc.model_copy(update={"attn_implementation": "eager"})
    for hooks in (["models.layers.1.post", "models.layers.0.mlp.pre"], ["models.layers.-1.self_attn.post"]):
        fast = pf.config_shape(tc, hooks)
        assert fast is not None and fast == pf.skeleton_shape(load_skeleton(tc), tc, hooks)
    bad = ["models.layers.4.post", "models.layers.-5.pre"]
    fast = pf.config_shape(tc, bad)
    assert fast is not None and fast.problems
    assert fast.problems == [p.split(". ")[0] for p in pf.skeleton_shape(load_skeleton(tc), tc, bad).problems]


@pytest.mark.parametrize("name", SHIPPED)
def test_config_shape_equals_the_skeleton_for_shipped_configs(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_mod.hub_offline.cache_clear()
    tc = make_cfg(name, "/v").transformer_config.model_copy(
        update={"dtype": "bfloat16", "attn_implementation": "eager"}
    )
    hooks = ["models.layers.2.mlp.post"]
    fast = pf.config_shape(tc, hooks)
    assert fast is not None and fast == pf.skeleton_shape(load_skeleton(tc), tc, hooks)
    assert fast.kept == 3 and fast.dtype == "bfloat16"


def test_module_paths_and_other_architectures_use_the_skeleton(tiny_model_dir):
    tc = make_cfg(tiny_model_dir("llama"), "/v").transformer_config
    assert pf.config_shape(tc, ["model.layers.0.mlp.down_proj.post"]) is None
    assert pf.config_shape(make_cfg(tiny_model_dir("gpt2"), "/v").transformer_config, ["models.layers.0.post"]) is None
    shape = pf.model_shape(tc, ["model.layers.0.mlp.down_proj.post"])
    assert shape.dims == {"model.layers.0.mlp.down_proj.post": 64} and shape.kept == 1


# ---- device, weights and blocks ----


def test_device_lines_say_weights_per_gpu_and_blocks_loaded(tiny_model_dir):
    tc = make_cfg(tiny_model_dir("llama"), "/v").transformer_config
    shape = pf.model_shape(tc, ["models.layers.1.post"])
    skeleton = load_skeleton(tc)
    kept = [n for n, _ in skeleton.named_parameters() if not n.startswith(("model.layers.2.", "model.layers.3."))]
    assert shape.params == sum(p.numel() for n, p in skeleton.named_parameters() if n in kept and "lm_head" not in n)
    from activault.units import human_bytes

    w = human_bytes(shape.weight_bytes)
    lines = pf.device_lines(tc, shape)
    assert lines == [
        "device       cpu, float32",
        f"weights      {w} in host memory",
        "blocks       2 of 4 loaded (only the blocks up to the deepest hook)",
    ]
    gpu = pf.device_lines(tc.model_copy(update={"device": "cuda:1"}), shape)[1]
    assert gpu == f"weights      {w} on cuda:1 (one device holds them all)"
    capped = tc.model_copy(update={"device": "auto", "max_per_device_memory": "100KB"})
    assert (
        f"at most 100KB each: {-(-shape.weight_bytes // 100_000)} GPU(s) or more" in pf.device_lines(capped, shape)[1]
    )
    last = pf.model_shape(tc, ["models.layers.-1.post"])
    assert (
        pf.device_lines(tc, last)[2] == "blocks       4 of 4 loaded (a hook needs the last block or one outside them)"
    )


def test_the_job_summary_shows_device_weights_and_blocks(tiny_model_dir, tmp_path, caplog):
    cfg = make_cfg(tiny_model_dir("llama"), str(tmp_path / "v"))
    with caplog.at_level(logging.INFO, logger="activault"):
        collect(cfg, show_progress=False)
    assert "device       cpu, float32" in caplog.text and "blocks       2 of 4 loaded" in caplog.text
    assert "weights      " in caplog.text


# ---- estimate imports neither torch nor transformers ----

AUDIT = """
import runpy, sys
sys.argv = ["activault", "estimate", "--config", sys.argv[1]]
try:
    runpy.run_module("activault", run_name="__main__")
except SystemExit as e:
    print("rc", e.code)
print("loaded", sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules))
"""


@pytest.mark.parametrize("model", ["local", "HuggingFaceTB/SmolLM2-135M"])
def test_estimate_imports_no_torch(model, tiny_model_dir, tmp_path):
    name = tiny_model_dir("llama") if model == "local" else model
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(make_cfg(name, str(tmp_path / "v")).model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-c", AUDIT, str(path)], capture_output=True, text=True, timeout=300)
    assert "rc 0" in out.stdout and "loaded []" in out.stdout, out.stdout + out.stderr
    assert "blocks       2 of " in out.stdout


# ---- n_batches: all ----


def test_the_estimate_of_n_batches_all_is_bounded_by_the_data_or_says_unknown(tiny_model_dir, tmp_path, monkeypatch):
    """Planned from the data's size, labelled as a bound (was: n_batches made up, planned as if real);
    a shortfall of free space against a bound is a note, not a refusal; an unknown size says why."""
    llama = tiny_model_dir("llama")
    lines = pf.estimate_lines(make_cfg(llama, str(tmp_path / "v"), {"n_batches": "all"}))
    size = Path(CORPUS).stat().st_size
    rows = -(-size // 32)
    assert f"tokens       at most {rows * 32:,} in at most {-(-rows // 4)} files of 4 rows x 32" in "\n".join(lines)
    assert any(line.startswith("total        at most ") for line in lines)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    lines = pf.estimate_lines(make_cfg(llama, str(tmp_path / "v"), {"n_batches": "all"}))
    assert any("1.0 MB free, and machine 0 may need up to" in line for line in lines)
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"hub": {"path": "org/corpus", "kind": "text"}}))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(llama, str(tmp_path / "v"), {"n_batches": "all", "data_key": "hub", "registry": str(registry)})
    lines, found = pf.estimate(cfg)
    assert found.problems == []
    text = "\n".join(lines)
    assert "tokens       unknown, in files of 4 rows x 32" in text and "'org/corpus' is not known" in text
    assert "total        unknown" in text and "note: free space at" in text
