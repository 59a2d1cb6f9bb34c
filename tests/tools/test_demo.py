"""tools/demo.py: the offline demo: a valid config on the packaged corpus, a tiny model built once, a
config file that loads back to the same config, and (slow) a collection whose printed figures equal
what the stored files hold."""

from __future__ import annotations

import re
import shutil
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from activault.cli import main
from activault.collection.hooks import resolve_hooks
from activault.collection.model import load_skeleton
from activault.config import Config, DataConfig, TransformerConfig, UploadConfig, load_config
from activault.errors import ConfigError
from activault.tools.demo import HOOKS, demo_config, prepare, run_demo
from activault.vault.megabatch import decode

CORPUS = Path(str(resources.files("activault").joinpath("demo_corpus.jsonl")))


def test_the_demo_config_is_small_valid_and_on_the_packaged_corpus(tmp_path):
    cfg = demo_config(tmp_path / "model", str(tmp_path / "vault"))
    d, u = cfg.data_config, cfg.upload_config
    assert Path(d.data_key) == CORPUS and CORPUS.is_file()
    assert cfg.storage == str(tmp_path / "vault") and cfg.run_name == "demo" and cfg.num_runs == 1
    assert (cfg.transformer_config.device, cfg.transformer_config.dtype) == ("cpu", "float32")
    assert u.hooks == HOOKS and d.clean_added_tokens and d.clean_default_system_prompt
    assert d.n_batches * d.batch_size * d.seq_length == 12_288
    assert cfg.machine_files(0) == 3
    other = demo_config(tmp_path / "m", "s", run_name="mine", corpus="/data/c.jsonl")
    assert (other.run_name, other.data_config.data_key) == ("mine", "/data/c.jsonl")


def test_the_demo_hooks_exist_in_the_demo_model(tiny_model_dir):
    cfg = demo_config(tiny_model_dir("llama"), "vault")
    specs = resolve_hooks(load_skeleton(cfg.transformer_config), HOOKS)
    assert [s.name for s in specs] == HOOKS


def test_prepare_builds_the_model_once_and_writes_a_config_that_loads_back(tmp_path, tiny_model_dir):
    storage = tmp_path / "vault"
    model_dir = tmp_path / "vault-demo" / "model"  # beside the store, visible, never inside it
    shutil.copytree(tiny_model_dir("llama"), model_dir)  # the demo's model: tiny llama, 4 layers, d=64
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    cfg, path = prepare(str(storage))
    assert path == tmp_path / "vault-demo" / "config.yaml"
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert load_config(path) == cfg and not storage.exists()
    assert Path(cfg.transformer_config.model_name) == model_dir and cfg.storage == str(storage)


def test_prepare_builds_a_missing_model_and_names_it_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, path = prepare("rel/vault")
    model_dir = tmp_path / "rel/vault-demo/model"
    assert (
        cfg.transformer_config.model_name == "rel/vault-demo/model" and path == tmp_path / "rel/vault-demo/config.yaml"
    )
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in model_dir.iterdir()}
    skeleton = load_skeleton(cfg.transformer_config)
    assert [s.name for s in resolve_hooks(skeleton, HOOKS)] == HOOKS
    text = path.read_text()
    assert f"Run it from {tmp_path} with: activault collect --config rel/vault-demo/config.yaml" in text


def test_a_vault_of_an_earlier_demo_keeps_its_hidden_model(tmp_path, tiny_model_dir):
    # Its run names that model (a data-shaping field): another path would refuse to resume it.
    storage = tmp_path / "vault"
    shutil.copytree(tiny_model_dir("llama"), storage / ".demo-model")
    cfg, path = prepare(str(storage))
    assert cfg.transformer_config.model_name == str(storage / ".demo-model")
    assert path == tmp_path / "vault-demo" / "config.yaml" and load_config(path) == cfg
    assert not (tmp_path / "vault-demo" / "model").exists()


def test_a_file_uri_is_the_same_folder_as_its_path(tmp_path, tiny_model_dir, monkeypatch):
    # It used to build in ./file:/... (Path("file:///x") is a relative path).
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "vault"
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "vault-demo" / "model")
    cfg, path = prepare(f"file://{storage}")
    assert path == tmp_path / "vault-demo" / "config.yaml" and load_config(path) == cfg
    assert cfg.transformer_config.model_name == "vault-demo/model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault-demo"], "nothing under ./file:"


@pytest.mark.parametrize("keep", [None, "mine"])
@pytest.mark.parametrize("storage", ["s3://bucket/runs", "gs://bucket", ""])
def test_a_storage_that_is_no_local_folder_is_refused_before_anything_is_built(tmp_path, monkeypatch, storage, keep):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        prepare(storage, keep=keep)
    if storage.startswith("s3"):
        assert str(e.value).startswith(f"--storage {storage}: the demo is offline and collects into a local folder")
        assert "--keep DIR" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_keep_leaves_model_corpus_config_and_vault_in_one_folder(tmp_path, tiny_model_dir):
    keep = tmp_path / "mine"
    shutil.copytree(tiny_model_dir("llama"), keep / "model")
    cfg, path = prepare(str(tmp_path / "ignored"), keep=str(keep))
    assert path == keep / "config.yaml" and load_config(path) == cfg
    assert (keep / "corpus.jsonl").read_bytes() == CORPUS.read_bytes()
    # Outside the working folder: absolute paths, runnable from anywhere.
    assert cfg.data_config.data_key == str(keep / "corpus.jsonl")
    assert cfg.transformer_config.model_name == str(keep / "model") and cfg.storage == str(keep / "vault")
    assert not (tmp_path / "ignored").exists(), "with keep, nothing goes to the storage argument"
    assert "Run it with: activault collect --config" in path.read_text()


def test_the_kept_config_is_short_commented_and_relative_to_the_working_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "mine" / "model")
    cfg, path = prepare("ignored", keep="mine")
    assert load_config(path) == cfg
    assert (cfg.transformer_config.model_name, cfg.data_config.data_key, cfg.storage) == (
        "mine/model",
        "mine/corpus.jsonl",
        "mine/vault",
    )
    lines = path.read_text().splitlines()
    assert str(tmp_path) not in "\n".join(ln for ln in lines if not ln.startswith("#"))
    raw = yaml.safe_load(path.read_text())
    defaults = {
        "": Config,
        "transformer_config": TransformerConfig,
        "data_config": DataConfig,
        "upload_config": UploadConfig,
    }
    for section, model in defaults.items():
        fields = raw if not section else raw[section]
        for name, value in fields.items():
            if name in defaults:
                continue
            info = model.model_fields[name]
            assert info.is_required() or value != info.get_default(call_default_factory=True), (section, name)
            at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{name}:"))
            assert lines[at - 1].strip().startswith("#"), f"{name} has its help above it"
    assert set(raw["data_config"]) < set(DataConfig.model_fields) and "max_pending" not in raw["upload_config"]
    assert "`activault hooks MODEL` lists every hook of a model" in path.read_text()


@pytest.mark.slow
def test_the_demo_prints_what_the_stored_files_hold(tmp_path, tiny_model_dir, capsys):
    storage = tmp_path / "vault"
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "vault-demo" / "model")
    run_demo(str(storage))
    out = capsys.readouterr().out
    files = sorted((storage / "demo" / HOOKS[0]).glob("*.safetensors"))
    parts = [decode(f.read_bytes(), f.name, verify_checksums=True) for f in files]
    first = parts[0]
    states = torch.cat([p.tensors["states"] for p in parts]).to(torch.float64).numpy()
    positions = torch.cat([p.tensors["positions"] for p in parts]).numpy()
    real = states[positions >= 0]  # [tokens, d]: padding is not in the statistics
    assert len(files) == 3 and real.shape[0] == 12_288
    shape = list(first.tensors["states"].shape)
    assert f"  states     {shape} float32" in out
    row = first.tensors["positions"][0].tolist()
    starts = sum(1 for i, p in enumerate(row) if p >= 0 and (i == 0 or p != row[i - 1] + 1))
    assert f"row 0 holds {starts} documents" in out
    stats = re.search(r"over ([\d,]+) tokens:\n  mean norm ([\d.]+); \|mean\| ([\d.]+); mean std ([\d.]+)", out)
    assert stats, out
    assert int(stats.group(1).replace(",", "")) == real.shape[0]
    assert float(stats.group(2)) == pytest.approx(np.linalg.norm(real, axis=1).mean(), abs=6e-5)
    assert float(stats.group(3)) == pytest.approx(np.linalg.norm(real.mean(axis=0)), abs=6e-5)
    assert float(stats.group(4)) == pytest.approx(real.std(axis=0).mean(), abs=6e-5)
    lo, hi = re.search(r"value range in this megabatch \[(-?[\d.]+), (-?[\d.]+)\]", out).groups()  # type: ignore[union-attr]
    first_states = first.tensors["states"].numpy()
    assert float(lo) == pytest.approx(first_states.min(), abs=6e-4) and float(hi) == pytest.approx(
        first_states.max(), abs=6e-4
    )
    assert "finite: True" in out and "3 files, 12,288 tokens" in out
    # The next steps it prints run as printed, on this run.
    commands = re.findall(r"^  (activault (?:ls|verify|stats|hooks) \S+(?: --dtype \S+)?)\s+#", out, re.M)
    assert [c.split()[1] for c in commands] == ["ls", "verify", "stats", "hooks"], out
    for command in commands:
        assert main(command.split()[1:]) == 0, command
    snippet = out.split("read it in Python:\n", 1)[1].split("\n  a run of your own")[0]
    exec(textwrap.dedent(snippet), {})
    assert f"activault collect --config {tmp_path / 'vault-demo' / 'config.yaml'}" in out
    capsys.readouterr()
    run_demo(str(storage))  # again: the run is complete, nothing is collected, and it says so
    again = capsys.readouterr().out
    assert f"the run {storage}/demo was already complete, so nothing was collected this time" in again
    assert "(it holds 3 files, 12,288 tokens)" in again and " MB in " not in again and "next steps:" in again
