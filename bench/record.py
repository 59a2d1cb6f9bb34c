"""What the benchmarks share: the stamp of each JSON line (date, commit, command, machine) and the
writer of their one-hook synthetic runs."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from activault.storage import Store
    from activault.vault.codec import Codec
    from activault.vault.writer import RunWriter

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


def run_writer(store: Store, run: str, d: int, rows: int, seq: int, codec: Codec | None = None) -> RunWriter:
    """A joined RunWriter of a run with one hook, "hook", of bfloat16 [rows, seq, d] files."""
    import torch

    from activault.vault import records
    from activault.vault.writer import RunWriter

    md = records.hook_metadata(
        run_name=run,
        hook="hook",
        d_model=d,
        dtype=torch.bfloat16,
        seq_length=seq,
        rows_per_file=rows,
        batch_size=rows,
        batches_per_upload=1,
        model="bench",
    )
    w = RunWriter(store, records.RunRecord(run_name=run, hooks=["hook"], num_runs=1), {"hook": md}, codec=codec)
    w.join()
    return w
