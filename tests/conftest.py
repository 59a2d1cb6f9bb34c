"""Shared fixtures: tiny random-weight models built locally (nothing from a hub)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from activault.storage import LocalStore
from activault.tools.tiny import build_tiny
from support.synth import SynthRun, write_synthetic_run

SLURM_LOCAL = Path(__file__).resolve().parent.parent / "scripts" / "slurm_local.sh"

# Hermetic: nothing from a hub, and Ray binds to loopback (by default it advertises the machine's
# interface address; ray reads this when it is imported, so it is set before any test imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    """SIGINT and SIGTERM end the session like Ctrl-C, once: the fixtures' teardown stops the servers.

    scripts/test.sh runs pytest in the background (so that its traps run at once), where SIGINT starts
    out ignored, and would stay ignored in every process a test starts; it stops pytest with SIGTERM.
    """
    main = os.getpid()
    stopping = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal stopping
        if os.getpid() != main:  # a forked worker inherited this handler: end as the signal would
            os._exit(128 + signum)
        if stopping:  # Ctrl-C reaches pytest and test.sh, which forwards it: one must not cut teardown
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(arch)`: folder with tokenizer + random model of `arch`, built once per session."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return built[arch]

    return get


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path, fsync=False)


@pytest.fixture
def run(local: LocalStore) -> SynthRun:
    return write_synthetic_run(local, "run", ["h1", "h2"], machines=2, files=3)


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """The local Slurm cluster: started by scripts/slurm_local.sh (and stopped after) when `sinfo` does
    not answer; never skipped."""
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        yield
        return
    out = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        pytest.fail(f"could not start the local Slurm cluster:\n{out.stdout}\n{out.stderr}")
    yield
    subprocess.run(["bash", str(SLURM_LOCAL), "stop"], check=True, timeout=120)
