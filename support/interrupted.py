"""Kill a Python child with SIGKILL at a chosen point of its work (tests of what a killed run leaves)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path

# Prepended to every child: `stop_here()` says the point is reached, then waits to be killed.
_PRELUDE = """
import os, sys, time
from pathlib import Path

def stop_here():
    Path(os.environ["ACTIVAULT_TEST_MARKER"]).touch()
    while True:
        time.sleep(60)
"""


def kill_when_reached(
    code: str,
    marker: Path,
    env: Mapping[str, str] | None = None,
    while_stopped: Callable[[], None] | None = None,
    timeout: float = 300,
) -> None:
    """Run `code` in a child and SIGKILL it once it calls `stop_here()` (after `while_stopped()`, run
    while the child is alive there); AssertionError (with the child's stderr) when it ends first or
    does not get there within `timeout`."""
    child_env = {**os.environ, **(env or {}), "ACTIVAULT_TEST_MARKER": str(marker)}
    errors = marker.with_name(marker.name + ".stderr")  # a file: a full pipe would block the child
    with errors.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
            env=child_env,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    reached = marker.exists()
    try:
        if reached and while_stopped is not None:
            while_stopped()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if not reached:
        tail = errors.read_text(errors="replace")[-2000:]
        raise AssertionError(f"the child ended (rc {proc.returncode}) before its stop point: {tail}")
