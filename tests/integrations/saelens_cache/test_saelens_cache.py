"""integrations/saelens_cache/__init__.py: the `activault export` and `activault import` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from activault.integrations.saelens_cache import add_subcommands
from support.integrations import HOOKS
from support.synth import SynthRun


def test_cli_subcommands(run: SynthRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="activault")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "export",
            str(tmp_path / "run"),
            str(tmp_path / "c"),
            "--hook",
            "h1",
            "--hook",
            "h2",
            "--column",
            "h1=blocks.0.hook_resid_pre",
        ]
    )
    assert args.func(args) == 0
    assert "2 row(s) end in padding (6 tokens: pad id, zero activations" in capsys.readouterr().out
    args = parser.parse_args(["import", str(tmp_path / "c"), str(tmp_path / "v/back"), "--rows-per-file", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "imported 24 rows (378 tokens)" in out  # every row, its padding not counted
    assert "note: imported from saelens-cached-activations at " in out
    assert "packing isolated segments, cross-document attention none\n" in out  # an export of a collection
    assert sorted(json.loads((tmp_path / "v/back/cfg.json").read_text())["hooks"]) == HOOKS
