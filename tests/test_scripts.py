"""The shell scripts leave nothing behind: the local Slurm cluster's daemons keep none of the caller's
descriptors and `stop` ends them all; scripts/test.sh ends whatever the suite left running; a missing
system prerequisite is named before anything is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmscriptd", "slurmstepd")


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


@pytest.mark.slurm
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


@pytest.mark.slurm
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


def prereqs(tmp_path: Path, what: str, tools: dict[str, str], **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/prereqs.sh in a checkout with no .venv yet, on a PATH holding only `tools` (name: script)."""
    (tmp_path / "scripts").mkdir(parents=True)
    (tmp_path / "scripts" / "prereqs.sh").write_text((ROOT / "scripts" / "prereqs.sh").read_text())
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("dirname", "id", "sh"):  # what bash needs to get going
        os.symlink(subprocess.run(["which", name], capture_output=True, text=True).stdout.strip(), bin_ / name)
    for name, body in tools.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    bash = subprocess.run(["which", "bash"], capture_output=True, text=True).stdout.strip()
    return subprocess.run(
        [bash, str(tmp_path / "scripts" / "prereqs.sh"), what],
        env={"PATH": str(bin_), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


PYTHON_OK = f'exec {sys.executable} "$@"'


def test_prereqs_names_every_missing_piece_with_its_fix_before_installing(tmp_path: Path) -> None:
    """No npm, no Slurm, no apt-get: all three named at once (as root, or not), nothing else run."""
    out = prereqs(tmp_path, "test", {"python3": PYTHON_OK})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Before installing anything" in out.stderr
    assert "apt-get install npm" in out.stderr
    assert "slurm-wlm" in out.stderr
    assert not (tmp_path / ".venv").exists() and not (tmp_path / ".ci").exists()


def test_prereqs_passes_when_everything_is_there(tmp_path: Path) -> None:
    ok = {"python3": PYTHON_OK, "npm": "true", "sinfo": "true", "slurmd": "true"}
    out = prereqs(tmp_path, "test", ok)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_prereqs_catches_a_python_without_venv_or_too_old(tmp_path: Path) -> None:
    no_ensurepip = f'case "$*" in *ensurepip*) exit 1 ;; esac; exec {sys.executable} "$@"'
    out = prereqs(tmp_path / "a", "demo", {"python3": no_ensurepip})
    assert out.returncode == 1 and "apt-get install python3-venv" in out.stderr
    out = prereqs(tmp_path / "b", "demo", {"python3": "exit 1"})
    assert out.returncode == 1 and "Python >= 3.10" in out.stderr
    out = prereqs(tmp_path / "c", "demo", {})
    assert out.returncode == 1 and "python3: not found" in out.stderr


def test_fresh_machine_check_reaches_registries_as_told_and_nothing_else_leaks_in(tmp_path: Path) -> None:
    """The registry, proxy and WHEELS settings reach the root's commands; the host's own pip settings do not.
    debootstrap, mount, chroot and git are stand-ins: chroot records the environment each command gets."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "fresh_machine_check.sh").write_text((ROOT / "scripts" / "fresh_machine_check.sh").read_text())
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"w")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "chroot.calls"
    stand_ins = {
        "id": "echo 0",
        "debootstrap": 'mkdir -p "$3/usr/sbin" "$3/etc"',
        "mount": "true",
        "umount": "true",
        "chroot": f'printf "%s\\n" "$@" >>{calls}; echo ===== >>{calls}',
        # the suite runs on a fresh root too, which has no git (the README does not ask for it)
        "git": f'[ "$1" = -C ] && shift 2; case "$1" in rev-parse) echo {repo} ;; clone) mkdir -p "$5" ;; esac',
    }
    for name, body in stand_ins.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    settings = {
        "PIP_INDEX_URL": "https://mirror.example/simple",
        "npm_config_registry": "https://npm.example/",
        "https_proxy": "http://proxy.example:3128",
        "WHEELS": str(wheels),
    }
    host_only = {"PIP_FIND_LINKS": "/host/wheels", "PIP_NO_CACHE_DIR": "1"}  # this machine's, not the check's
    work = tmp_path / "work"
    out = subprocess.run(
        ["bash", str(repo / "scripts" / "fresh_machine_check.sh"), str(work)],
        env={"PATH": f"{bin_}:{os.environ['PATH']}", "KEEP": "1", **settings, **host_only},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    commands = calls.read_text().split("=====\n")[:-1]
    assert len(commands) == 3, commands  # packages, demo, test
    for command in commands:
        args = command.splitlines()
        assert args[1:3] == ["/usr/bin/env", "-i"], args
        assert "PIP_INDEX_URL=https://mirror.example/simple" in args
        assert "npm_config_registry=https://npm.example/" in args
        assert "https_proxy=http://proxy.example:3128" in args
        assert "PIP_FIND_LINKS=/opt/wheels" in args  # the copy inside the root, not the host's folder
        assert "PIP_NO_CACHE_DIR=1" not in args
    assert (work / "root" / "opt" / "wheels" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").exists()
    assert "no process left running in the root" in (work / "timings.txt").read_text()
