"""Kill a collection with SIGKILL once its progress record counts enough files (resume tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def kill_after_files(config: Path, progress: Path, targets: Iterable[int], timeout: float = 120) -> int:
    """Run `activault collect --config config` once per target, SIGKILLed as soon as `progress`
    records that many files; returns how many runs were killed (not finished first)."""
    kills = 0
    for target in targets:
        proc = subprocess.Popen(
            [sys.executable, "-m", "activault", "collect", "--config", str(config), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["files_done"] >= target:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    return kills
