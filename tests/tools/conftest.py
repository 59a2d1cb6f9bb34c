"""Fixtures of the tools' tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from activault.storage import LocalStore, Store
from activault.storage.s3 import S3Store
from support.synth import s3_env


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3)])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, Store]:
    """Two empty stores of one kind (local folders, or two prefixes of a fresh moto bucket)."""
    if request.param == "local":
        return LocalStore(tmp_path / "a", fsync=False), LocalStore(tmp_path / "b", fsync=False)
    url, bucket = request.getfixturevalue("moto_url"), request.getfixturevalue("moto_bucket")
    return S3Store(f"s3://{bucket}/a", env=s3_env(url)), S3Store(f"s3://{bucket}/b", env=s3_env(url))
