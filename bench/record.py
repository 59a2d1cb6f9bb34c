"""What every benchmark's JSON line says about where it ran: date, commit, command, machine."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """git's answer in the repository, "" where there is none: no git installed (a fresh machine's
    README commands need none), or not a checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def stamp(module: str, argv: list[str]) -> dict[str, Any]:
    """The fields that say when, at which commit and with which command a figure was measured."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": shlex.join(["python", "-m", module, *argv]),
        "cpus": os.cpu_count(),
    }
