"""A run's state as tests set it: a store on the local disk or moto, cfg.json's plan, progress records
edited field by field (an unfinished machine, a damaged count)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from activault.storage import LocalStore, Store
from support.synth import create_bucket, s3_env


def store_at(where: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, str, dict[str, Any]]:
    """(store, its URI, store_options): the local store, or a fresh bucket on the session's moto server."""
    if where == "local":
        return LocalStore(tmp_path, fsync=False), str(tmp_path), {}
    from activault.storage.s3 import S3Store

    url = request.getfixturevalue("moto_url")
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    create_bucket(url, bucket)
    env = s3_env(url)
    return S3Store(f"s3://{bucket}", env=env), f"s3://{bucket}", {"env": env}


def with_plan(store: Store, run: str, n_batches: int, batches_per_upload: int = 1, **data: Any) -> None:
    """Give a synthetic run's cfg.json the config fields collect records that plan each machine's files."""
    cfg = json.loads(store.get_text(f"{run}/cfg.json"))
    cfg["config"] = {
        "data_config": {"n_batches": n_batches, **data},
        "upload_config": {"batches_per_upload": batches_per_upload},
    }
    store.put_text(f"{run}/cfg.json", json.dumps(cfg))


def edit_progress(store: Store, run: str, machine: int, **fields: Any) -> None:
    """Change fields of machine `machine`'s progress record (None: remove the field)."""
    key = f"{run}/progress/machine-{machine:05d}.json"
    rec = json.loads(store.get_text(key))
    rec.update(fields)
    store.put_text(key, json.dumps({k: v for k, v in rec.items() if v is not None}))
