"""The shell scripts leave nothing behind: the local Slurm cluster's daemons keep none of the caller's
descriptors and `stop` ends them all; scripts/test.sh ends whatever the suite left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmscriptd", "slurmstepd")

pytestmark = pytest.mark.slurm


def live(names: tuple[str, ...] = DAEMONS) -> dict[int, str]:
    """pid -> name of the running (not zombie) processes with one of these names."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # ended meanwhile
        name, state = fields[0].split("(", 1)[1], fields[1].split()[0]
        if name in names and state != "Z":
            out[int(stat.parent.name)] = name
    return out


def slurm_local(cmd: str, **kw) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["bash", str(SLURM_LOCAL), cmd], capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"slurm_local.sh {cmd}:\n{out.stdout}\n{out.stderr}"
    return out


def holds_writer(read_end: int) -> bool:
    """Whether any process still holds the write end of the pipe (the caller's own end is closed)."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) != b""
    except BlockingIOError:
        return True


def test_slurm_local_daemons_keep_no_caller_descriptor_and_stop_ends_them(tmp_path: Path) -> None:
    was_up = subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    slurm_local("stop")  # the daemons must be started by the call below, holding our descriptors
    try:
        before = live()
        assert not {p for p, n in before.items() if n != "munged"}, before
        r, w = os.pipe()
        lock = tmp_path / "caller.lock"
        with open(lock, "w") as lock_file:
            slurm_local("start", pass_fds=(w, lock_file.fileno()))
        os.close(w)
        started = {p: n for p, n in live().items() if p not in before}
        assert {"slurmctld", "slurmd", "slurmscriptd"} <= set(started.values()), started
        for pid, name in started.items():
            fds = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
            assert str(lock) not in fds, f"{name} holds the caller's lock file"
        assert not holds_writer(r), "a daemon holds the caller's pipe"
        os.close(r)

        slurm_local("stop")
        after = live()
        assert not set(after) - set(before), f"still running after stop: {after}"
        assert subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0
    finally:
        if was_up:
            slurm_local("start")  # as it was: other tests of this session use the cluster


ESCAPE = """
import os, subprocess

def test_leaves_a_daemon():
    # its own session, holding the outer caller's pipe: what a daemon started carelessly does
    subprocess.run(["setsid", "-f", "sleep", "600"], pass_fds=(int(os.environ["CALLER_FD"]),))
"""


def test_test_sh_ends_what_the_suite_left_running(slurm: None, tmp_path: Path) -> None:
    """The cluster is up (`slurm`), so the inner test.sh neither starts nor stops it."""
    (tmp_path / "test_escape.py").write_text(ESCAPE)
    r, w = os.pipe()
    env = {**os.environ, "SKIP_SETUP": "1", "PYTHON": sys.executable, "CALLER_FD": str(w)}
    env.pop("ACTIVAULT_TEST_RUN", None)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test.sh"), str(tmp_path / "test_escape.py"), "-p", "no:cacheprovider", "-q"],
        env=env,
        pass_fds=(w,),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    os.close(w)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ending what the suite left running" in out.stderr
    assert not holds_writer(r), "the escaped process still runs"
    os.close(r)
