"""The command line: version, logging, the packaged Slurm script, demo --keep, helpful errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from activault.cli import main
from activault.collection.hooks import resolve_hooks
from activault.collection.model import load_skeleton
from activault.config import TransformerConfig, load_config
from activault.errors import ConfigError
from activault.tools.launch import default_slurm_script
from activault.version import __version__
from support.collecting import make_cfg, run_cli
from support.synth import write_synthetic_run


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"activault {__version__}"


def test_library_messages_are_printed_once() -> None:
    # huggingface_hub installs its own handler and propagates: a root handler printed each line twice.
    code = (
        "import logging, sys\n"
        "from activault import cli\n"
        "from huggingface_hub.utils import logging as hf\n"
        "hf.get_logger('huggingface_hub.test')\n"
        "cli._setup_logging(False)\n"
        "logging.getLogger('huggingface_hub.test').warning('retrying once')\n"
        "logging.getLogger('activault.test').info('ours once')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.count("retrying once") == 1 and out.stderr.count("ours once") == 1, out.stderr


def test_packaged_slurm_script_is_found_from_anywhere(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = default_slurm_script()
    assert script.is_file() and "activault collect" in script.read_text()


def test_stats_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys) -> None:
    from activault.storage import LocalStore

    store = LocalStore(tmp_path / "vault", fsync=False)
    write_synthetic_run(store, "run", ["h"], machines=1, files=1)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    rc = main(["stats", str(tmp_path / "vault" / "run" / "h"), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "activault[plot]" in err, err


def test_unknown_hook_suggests_the_closest_names(tiny_model_dir) -> None:
    skeleton = load_skeleton(TransformerConfig(model_name=str(tiny_model_dir("llama")), device="cpu"))
    with pytest.raises(ConfigError, match=r"Did you mean 'models.layers.1.mlp.post'"):
        resolve_hooks(skeleton, ["models.layers.1.mlpp.post"])
    # The model's own module path is a valid hook too, and resolves to the same module.
    ours, theirs = resolve_hooks(skeleton, ["models.layers.1.post", "model.layers.1.post"])
    assert ours.module == theirs.module and ours.kind == theirs.kind


def test_demo_keep_leaves_a_runnable_first_own_run(tmp_path, capsys) -> None:
    keep = tmp_path / "mine"
    assert main(["demo", "--keep", str(keep)]) == 0
    assert {"model", "corpus.jsonl", "config.yaml", "vault"} <= {p.name for p in keep.iterdir()}
    cfg = load_config(keep / "config.yaml")
    assert cfg.data_config.data_key == str(keep / "corpus.jsonl")
    assert cfg.transformer_config.model_name == str(keep / "model")
    raw = yaml.safe_load((keep / "config.yaml").read_text())
    raw["run_name"] = "mine"
    (keep / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["collect", "--config", str(keep / "config.yaml"), "--quiet"]) == 0
    assert Path(keep / "vault" / "mine" / "cfg.json").is_file()
    assert "activault collect --config" in capsys.readouterr().out


def test_collect_repair_collects_a_damaged_file_again(tiny_model_dir, tmp_path, capsys) -> None:
    from activault.collection.pipeline import collect

    cfg = make_cfg(tiny_model_dir("llama"), tmp_path)
    collect(cfg, show_progress=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    file = tmp_path / "run" / cfg.upload_config.hooks[1] / "m00000-000000.safetensors"
    want = file.read_bytes()
    file.write_bytes(b"")
    rc, _, err = run_cli(["collect", "--config", str(path), "--machine", "0", "--repair", "--quiet"], capsys)
    assert rc == 0 and file.read_bytes() == want and "repaired file(s) [0]" in err, err


@pytest.mark.parametrize("name", ["shell", "s3"])
def test_the_shell_is_called_shell_and_s3_still_names_it(tmp_path, name) -> None:
    (tmp_path / "vault" / "run1").mkdir(parents=True)
    env = {**os.environ, "ACTIVAULT_HISTORY": str(tmp_path / "history"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "activault", name, "--root", str(tmp_path / "vault")]
    out = subprocess.run(argv, input="ls\nexit\n", capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "activault shell on" in out.stdout and "run1/" in out.stdout, out


def test_the_help_starts_a_newcomer_with_demo_then_estimate_then_collect(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("Start here:")
    assert start < text.index("positional arguments")
    order = [text.index(f"`activault {c}", start) for c in ("demo", "estimate --config", "collect --config")]
    assert order == sorted(order)
    assert "shell (s3) interactive shell" in text and "`s3` is another name for it" in text
    assert "hooks the hook names a config may use on a model" in text


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_closed_pipe_ends_a_command_quietly(tmp_path, unbuffered: str) -> None:
    """`activault ls ... | head -1`: no BrokenPipeError traceback, the status a SIGPIPE'd command has.
    Buffered (Python's default on a pipe) the write fails only at the final flush."""
    import subprocess
    import sys

    from activault.storage import LocalStore
    from support.synth import write_synthetic_run

    write_synthetic_run(LocalStore(tmp_path), "run", ["h1", "h2"], files=3)
    p = subprocess.Popen(
        [sys.executable, "-m", "activault", "ls", str(tmp_path), "--files"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONUNBUFFERED": unbuffered},
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the listing is written, as `head` does once it has its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
