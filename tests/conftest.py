"""Shared fixtures: tiny random-weight models built locally (nothing from a hub)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from activault.storage import LocalStore
from activault.tools.tiny import build_tiny
from support.s3servers import MotoServer
from support.stopsignals import (  # noqa: F401 - pytest hooks: registered by being in this module
    pytest_configure,
    pytest_runtest_makereport,
)
from support.synth import SynthRun, write_synthetic_run

SLURM_LOCAL = Path(__file__).resolve().parent.parent / "scripts" / "slurm_local.sh"

# Hermetic: nothing from a hub, and Ray binds to loopback (by default it advertises the machine's
# interface address; ray reads this when it is imported, so it is set before any test imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


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


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """The one moto S3 server of the session, on a free loopback port; stopped at the end."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_url(moto: MotoServer) -> str:
    return moto.url


@pytest.fixture
def moto_bucket(moto: MotoServer) -> str:
    """A fresh, empty bucket on the session's moto server: tests never see each other's objects."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name
