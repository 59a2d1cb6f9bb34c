"""A stop signal ends the test session for good (support/stopsignals.py): also when a library took
the handler over, as `ray.init` does, and when a test swallowed the interrupt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TAKEN = """
def test_a_library_takes_the_signal():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does

def test_stopped_here():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
"""

SWALLOWED = """
def test_swallows_the_stop():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    except BaseException:
        pass
"""


@pytest.mark.parametrize("tests", [TAKEN, SWALLOWED], ids=["handler-taken", "interrupt-swallowed"])
def test_a_stop_signal_ends_the_session_after_the_test_it_hit(tmp_path: Path, tests: str) -> None:
    ran = tmp_path / "ran"
    body = "import os, signal, sys, time\n" + tests + f"\ndef test_never_runs():\n    open({str(ran)!r}, 'w')\n"
    (tmp_path / "test_inner.py").write_text(body)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "support.stopsignals", "-p", "no:cacheprovider", "-q", "test_inner.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == pytest.ExitCode.INTERRUPTED, out.stdout + out.stderr
    assert not ran.exists(), "the session went on after the stop signal"
    if tests is SWALLOWED:
        assert "stopped by SIGTERM" in out.stdout
