"""Shared fixtures: tiny random-weight models built locally (nothing from a hub)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from activault.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(arch)`: folder with tokenizer + random model of `arch`, built once per session."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return built[arch]

    return get
