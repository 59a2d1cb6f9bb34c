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
    assert "dropped 2 rows holding padding (26 real tokens)" in capsys.readouterr().out
    args = parser.parse_args(["import", str(tmp_path / "c"), str(tmp_path / "v/back"), "--rows-per-file", "4"])
    assert args.func(args) == 0
    assert "imported 22 rows" in capsys.readouterr().out
    assert sorted(json.loads((tmp_path / "v/back/cfg.json").read_text())["hooks"]) == HOOKS
