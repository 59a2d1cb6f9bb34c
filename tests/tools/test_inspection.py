"""`activault ls|inspect|stats|estimate` against synthetic runs: output, planted faults, exit codes.

`verify` is in test_verify.py; the end-to-end tests here (a collected run, S3) run it too.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from activault.storage import LocalStore, Store
from activault.tools.inspection import inspect_file, sample_norms, stats_figure
from activault.tools.recompress import convert_file
from activault.tools.tiny import demo_texts
from activault.vault import codec as codecs
from activault.vault import megabatch as fmt
from activault.vault.records import file_name, read_statistics
from support.collecting import run_cli
from support.s3servers import free_port
from support.synth import SynthRun, write_synthetic_run

HOOKS = ["models.layers.0.post", "models.layers.1.mlp.post"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def retokenize(store: Store, run: SynthRun, tokenizer_dir: Path) -> list[list[int]]:
    """Give the synthetic run real token ids (same in every hook) and name a real tokenizer in cfg.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream = [t for text in demo_texts() for t in tok(text)["input_ids"]]
    offset = 0
    for name in run.names:
        ref = run.files[run.hooks[0]][name]
        n = ref["input_ids"].numel()
        ids = torch.tensor(stream[offset : offset + n], dtype=torch.int32).view_as(ref["input_ids"])
        offset += n
        for h in run.hooks:
            t = run.files[h][name]
            t["input_ids"] = ids
            store.put(f"{run.run}/{h}/{name}", fmt.encode(t, {"format": "activault", "hook": h, "model": "tiny"}))
    cfg = json.loads(store.get_text(f"{run.run}/cfg.json"))
    cfg["tokenizer"] = str(tokenizer_dir)
    store.put_text(f"{run.run}/cfg.json", json.dumps(cfg))
    first = run.files[run.hooks[0]][run.names[0]]
    return [r[p >= 0].tolist() for r, p in zip(first["input_ids"], first["positions"], strict=True)]


def compress_and_edit(store: Store, key: str, **change: object) -> bytes:
    """Store `key` zstd-compressed, then change fields of its `states` codec description (as a hostile
    or careless edit of the JSON header would, the length prefix rewritten); the edited bytes."""
    convert_file(store, key, codecs.Codec("zstd", chunk_bytes=256))
    data = bytes(store.get(key))
    (n,) = struct.unpack_from("<Q", data)
    raw = json.loads(data[8 : 8 + n])
    described = json.loads(raw["__metadata__"][fmt.CODECS_KEY])
    described["states"].update(change)
    raw["__metadata__"][fmt.CODECS_KEY] = json.dumps(described)
    head = json.dumps(raw).encode()
    head += b" " * (-len(head) % 8)
    edited = struct.pack("<Q", len(head)) + head + data[8 + n :]
    store.put(key, edited)
    return edited


def with_hook_dims(store: Store, run: str, dims: dict[str, int]) -> None:
    """Give a synthetic run's cfg.json the hook widths collect records."""
    cfg = json.loads(store.get_text(f"{run}/cfg.json"))
    store.put_text(f"{run}/cfg.json", json.dumps({**cfg, "hook_dims": dims}))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def vault(tmp_path: Path) -> tuple[LocalStore, SynthRun]:
    store = LocalStore(tmp_path / "vault", fsync=False)
    return store, write_synthetic_run(store, "run", HOOKS, machines=2, files=2)


# ---- inspect ----


def test_inspect_decodes_rows_with_the_runs_tokenizer(vault, tiny_model_dir: Callable[[str], Path], capsys) -> None:
    store, run = vault
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir("llama")
    rows = retokenize(store, run, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    key = f"run/{HOOKS[0]}/{run.names[0]}"
    insp = inspect_file(store, key)
    assert insp.decoded and insp.row_text(1) == tok.decode(rows[1])
    assert insp.tensors["states"] == {"shape": [4, 16, 8], "dtype": "bfloat16"}
    states = run.files[HOOKS[0]][run.names[0]]["states"].float()
    assert insp.checks["min"] == pytest.approx(float(states.min())) and not insp.checks["nan"]

    rc, out, _ = run_cli(["inspect", str(store.root / key)], capsys)
    assert rc == 0
    for text in ("Model: tiny", "states: [4, 16, 8] bfloat16", "No NaNs: ✅", "No Infs: ✅", "Value range: ["):
        assert text in out
    assert str(tok.decode(rows[0]))[:40].replace("\n", "\\n") in out

    rc, out, _ = run_cli(["inspect", str(store.root / key), "--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["decoded"] and report["rows"] == 4 and report["tensors"]["input_ids"]["shape"] == [4, 16]


def test_inspect_flags_nan_and_inf_and_shows_ids_without_tokenizer(vault, capsys) -> None:
    store, run = vault
    t = dict(run.files[HOOKS[0]][run.names[0]])
    t["states"] = t["states"].clone()
    t["states"][0, 0, 0] = float("nan")
    t["states"][0, 0, 1] = float("inf")
    store.put(f"run/{HOOKS[0]}/bad.safetensors", fmt.encode(t, {}))
    rc, out, _ = run_cli(["inspect", str(store.root / "run" / HOOKS[0] / "bad.safetensors")], capsys)
    assert rc == 0 and "No NaNs: ❌" in out and "No Infs: ❌" in out
    assert "tokenizer 'synthetic' is not in the local Hugging Face cache" in out and "showing ids" in out
    ids = run.files[HOOKS[0]][run.names[0]]["input_ids"][0][:5].tolist()
    assert "Row 0: " + " ".join(map(str, ids)) in out


def test_inspect_of_a_hub_tokenizer_without_the_hub_shows_ids_and_says_why(vault, monkeypatch, capsys) -> None:
    """No HF_HUB_OFFLINE, the Hub at a closed port: the quick check says offline, so the Hub is never
    asked (its client retried for ~49 s); the rows are ids, with the reason and the fix."""
    from transformers import AutoTokenizer

    from activault.collection.model import hub_offline

    store, run = vault
    cfg = json.loads(store.get_text("run/cfg.json"))
    store.put_text("run/cfg.json", json.dumps({**cfg, "tokenizer": "no-org/no-such-tokenizer"}))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    hub_offline.cache_clear()
    asked: list[dict[str, object]] = []

    def from_pretrained(name: str, **kwargs: object) -> None:
        asked.append(kwargs)
        raise OSError(f"{name} is not in the cache" if kwargs.get("local_files_only") else "the Hub was asked")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    try:
        rc, out, _ = run_cli(["inspect", str(store.root / "run" / HOOKS[0] / run.names[0])], capsys)
        assert hub_offline() is True
    finally:
        hub_offline.cache_clear()
    assert rc == 0 and asked == [{"local_files_only": True}]
    assert "tokenizer 'no-org/no-such-tokenizer' is not in the local Hugging Face cache and the Hub is" in out
    assert "`hf download no-org/no-such-tokenizer`" in out and "HF_HUB_OFFLINE unset" in out and "showing ids" in out
    ids = run.files[HOOKS[0]][run.names[0]]["input_ids"][0][:5].tolist()
    assert "Row 0: " + " ".join(map(str, ids)) in out


@pytest.mark.parametrize(
    "target, message",
    [
        ("run/models.layers.0.post/m00099-000000.safetensors", "does not exist"),
        ("run/cfg.json", "is not a megabatch"),
        ("run/models.layers.0.post", "is not a megabatch"),
        ("run/garbage.safetensors", "corrupted or truncated header"),
    ],
)
def test_inspect_user_errors_are_one_line_exit_2(vault, capsys, target: str, message: str) -> None:
    store, _ = vault
    store.put("run/garbage.safetensors", b"\xff" * 64)
    rc, out, err = run_cli(["inspect", str(store.root / target)], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_uri_scheme_exits_2(capsys) -> None:
    rc, _, err = run_cli(["ls", "gs://bucket/run"], capsys)
    assert rc == 2 and "unsupported storage scheme" in err


# ---- ls ----


def test_ls_lists_runs_hooks_and_files(vault, capsys) -> None:
    store, run = vault
    rc, out, _ = run_cli(["ls", str(store.root)], capsys)
    assert rc == 0
    assert "run/cfg.json" in out and f"run/{HOOKS[0]}/  4 files" in out and f"run/{HOOKS[1]}/  4 files" in out
    assert run.names[0] not in out
    rc, out, _ = run_cli(["ls", str(store.root / "run" / HOOKS[0]), "--files"], capsys)
    assert rc == 0 and all(n in out for n in run.names)
    rc, _, err = run_cli(["ls", str(store.root / "nope")], capsys)
    assert rc == 2 and "does not exist" in err


def test_ls_prints_names_with_control_characters_escaped(vault, capsys) -> None:
    """A name holding a newline or an escape sequence would corrupt the listing or the terminal."""
    store, _ = vault
    (store.root / "run" / "notes\nfake line.txt").write_text("x")
    (store.root / "run" / HOOKS[0] / "\x1b[2Jclear").write_text("x")
    rc, out, _ = run_cli(["ls", str(store.root)], capsys)
    assert rc == 0 and "\x1b" not in out and "\nfake line" not in out
    assert repr("run/notes\nfake line.txt") in out and repr(f"run/{HOOKS[0]}/\x1b[2Jclear") in out


# ---- stats ----


def test_stats_table_and_plot(vault, tmp_path: Path, capsys) -> None:
    store, run = vault
    out_png = tmp_path / "stats.png"
    rc, out, _ = run_cli(["stats", str(store.root / "run" / HOOKS[1]), "--plot", str(out_png)], capsys)
    s = run.stats[HOOKS[1]]
    assert rc == 0 and f"{s.count:,} tokens" in out and f"{s.mean_norm:.4f}" in out and "machines    [0, 1]" in out
    assert f"[{float(s.mean.min()):.4f}, {float(s.mean.max()):.4f}]" in out
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE

    stats = read_statistics(store, f"run/{HOOKS[1]}")
    norms = sample_norms(store, f"run/{HOOKS[1]}", files=2)
    fig = stats_figure(stats, norms)
    axes = fig.get_axes()
    assert len(axes) == 3 and [a.get_xlabel() for a in axes] == ["dimension", "dimension", "L2 norm"]
    assert np.asarray(axes[0].get_lines()[0].get_ydata()).shape == (8,) and norms.numel() > 0
    rc, _, err = run_cli(["stats", str(store.root / "run" / "nohook")], capsys)
    assert rc == 2 and "statistics.json does not exist" in err


# ---- estimate ----


def test_estimate_from_config_without_weights(tiny_model_dir, tmp_path: Path, capsys) -> None:
    from activault.tools.demo import demo_config

    cfg = demo_config(tiny_model_dir("llama"), str(tmp_path / "vault")).model_dump(mode="json")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out, _ = run_cli(["estimate", "--config", str(path), "--price", "1.0", "--bandwidth", "8Mbps"], capsys)
    assert rc == 0
    tokens = 12 * 8 * 128
    per_hook = tokens * (64 * 4 + 8)  # float32 states of d=64 + int32 id and position
    assert f"{tokens:,}" in out and "3 per hook" in out and out.count("d=64") == 3
    total = 3 * per_hook
    assert f"${total / 1e9:,.2f}/month at $1.0/GB-month" in out
    assert f"{total / 1e6:.0f} s at 8Mbps" in out or "min at 8Mbps" in out
    rc, _, err = run_cli(["estimate", "--config", str(path), "--bandwidth", "fast"], capsys)
    assert rc == 2 and "bandwidth 'fast'" in err


# ---- a real collection, and S3 ----


def test_verify_inspect_and_stats_on_a_collected_run(tiny_model_dir, tmp_path: Path, capsys) -> None:
    from activault.collection.pipeline import collect
    from activault.tools.demo import HOOKS as DEMO_HOOKS
    from activault.tools.demo import demo_config

    cfg = demo_config(tiny_model_dir("llama"), str(tmp_path / "vault"))
    cfg.data_config.n_batches = 6
    collect(cfg, show_progress=False)
    run_dir = tmp_path / "vault" / "demo"
    rc, out, _ = run_cli(["verify", str(run_dir)], capsys)
    assert rc == 0 and out.startswith("OK") and f"3 hooks, 2 files per hook, {6 * 8 * 128:,} tokens" in out
    rc, out, _ = run_cli(["inspect", str(run_dir / DEMO_HOOKS[0] / file_name(0, 0))], capsys)
    assert rc == 0 and "First 4 rows as text" in out and "JSON" in out
    rc, out, _ = run_cli(["stats", str(run_dir / DEMO_HOOKS[1])], capsys)
    assert rc == 0 and "d_model     64" in out and "machines    [0]" in out


@pytest.mark.s3
def test_commands_on_s3(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    from activault.storage import open_store
    from support.synth import create_bucket, s3_env

    create_bucket(moto_url, "inspect-cmds")
    for k, v in s3_env(moto_url).items():
        monkeypatch.setenv(k, v)
    store = open_store("s3://inspect-cmds/prefix")
    run = write_synthetic_run(store, "run", HOOKS, machines=2, files=2)
    base = "s3://inspect-cmds/prefix/run"
    rc, out, _ = run_cli(["verify", base], capsys)
    assert rc == 0 and out.startswith(f"OK  {base}: 2 hooks, 4 files")
    rc, out, _ = run_cli(["ls", "s3://inspect-cmds"], capsys)
    assert rc == 0 and f"prefix/run/{HOOKS[0]}/  4 files" in out
    rc, out, _ = run_cli(["inspect", f"{base}/{HOOKS[0]}/{run.names[1]}", "--json"], capsys)
    assert rc == 0 and json.loads(out)["tensors"]["states"]["shape"] == [4, 16, 8]
    rc, out, _ = run_cli(["stats", f"{base}/{HOOKS[0]}", "--plot", str(tmp_path / "s.png")], capsys)
    assert rc == 0 and (tmp_path / "s.png").read_bytes()[:8] == PNG_SIGNATURE
    store.delete(f"run/{HOOKS[0]}/{run.names[0]}")
    store.put(f"run/{HOOKS[1]}/{run.names[1]}", bytes(store.get(f"run/{HOOKS[1]}/{run.names[1]}"))[:100])
    rc, out, _ = run_cli(["verify", base], capsys)
    assert rc == 1 and f"{HOOKS[0]}: 1 file(s) missing" in out and f"{HOOKS[1]}/{run.names[1]}: truncated file" in out
    rc, _, err = run_cli(["inspect", f"{base}/{HOOKS[0]}/{run.names[0]}"], capsys)
    assert rc == 2 and "does not exist" in err


# ---- a vault of the original Activault ----


def test_ls_inspect_and_stats_on_an_original_activault_vault(tmp_path: Path, capsys) -> None:
    from support.original import MODEL, write_original_vault

    store = LocalStore(tmp_path / "vault", fsync=False)
    old = write_original_vault(store, "run", HOOKS, files=2, batch_size=2, batches_per_file=2, seq=8, d=16)
    rc, out, _ = run_cli(["ls", str(store.root / "run")], capsys)
    assert rc == 0 and f"{HOOKS[0]}/  2 files" in out and f"{HOOKS[1]}/  2 files" in out
    rc, out, _ = run_cli(["ls", "--files", str(store.root / "run" / HOOKS[0])], capsys)
    assert rc == 0 and all(n in out for n in old.names)

    name = old.names[1]
    rc, out, _ = run_cli(["inspect", "--json", str(store.root / "run" / HOOKS[1] / name)], capsys)
    got = json.loads(out)
    assert rc == 0 and got["model"] == MODEL and got["tokenizer"] == MODEL and got["rows"] == 4
    assert got["tensors"]["states"] == {"shape": [4, 8, 16], "dtype": "float16"}
    assert got["tensors"]["input_ids"] == {"shape": [4, 8], "dtype": "int64"}
    assert got["checks"]["checksums"] == "none (a .pt file of the original Activault)" and not got["decoded"]
    ids = old.files[HOOKS[1]][name]["input_ids"][0].tolist()
    assert got["preview"][0] == " ".join(map(str, ids))

    out_png = tmp_path / "stats.png"
    rc, out, _ = run_cli(["stats", str(store.root / "run" / HOOKS[0]), "--plot", str(out_png)], capsys)
    assert rc == 0 and "NOT EXACT, written by the original Activault" in out and "count       unknown" in out
    assert "machine 0's tokens only" in out and out_png.read_bytes()[:8] == PNG_SIGNATURE


# ---- hostile headers ----


def test_inspect_refuses_a_codec_shape_beyond_the_file_before_allocating(vault, capsys) -> None:
    store, run = vault
    key = f"run/{HOOKS[0]}/{run.names[0]}"
    compress_and_edit(store, key, shape=[4, 16, 2**33])  # 128 TiB, said by ~1 KiB
    rc, out, err = run_cli(["inspect", str(store.root / key)], capsys)
    assert rc == 2 and "Traceback" not in out + err
    assert f"{store.root / key} 'states': the header says chunk 0" in err and "more than zstd can produce" in err


def test_inspect_refuses_an_edited_dtype_and_shape_naming_the_file(vault, capsys) -> None:
    """bf16 [4, 16, 8] read as f32 [4, 16, 4]: the same bytes, a valid header, garbage numbers."""
    store, run = vault
    key = f"run/{HOOKS[0]}/{run.names[0]}"
    compress_and_edit(store, key, dtype="F32", shape=[4, 16, 4])
    rc, out, err = run_cli(["inspect", str(store.root / key)], capsys)
    assert rc == 2 and "Checksums: verified" not in out
    assert f"{store.root / key}: the bytes of tensor 'states' do not match their checksum" in err
    with_hook_dims(store, "run", dict.fromkeys(HOOKS, 8))  # with the run's record: refused before decoding
    rc, out, err = run_cli(["inspect", str(store.root / key)], capsys)
    assert rc == 2 and f"{store.root / key}: its header says states are [4, 16, 4] float32, cfg.json's" in err
