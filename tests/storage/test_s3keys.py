"""Keys object_store cannot name (an empty, `.` or `..` segment), written by another tool: one of them
fails object_store's whole listing, so storage/s3keys.py lists them; readers then read the run and
name those keys as foreign objects."""

from __future__ import annotations

import pytest
import torch

from activault import RCache, TokenLoader
from activault.storage.s3 import S3Store
from activault.storage.s3keys import RawS3, bad_key
from support.s3servers import MotoServer
from support.synth import write_synthetic_run

pytestmark = pytest.mark.s3
ODD = ["run/h//y.safetensors", "run/h/../x", "run/h/./m00000-000009.safetensors"]


def test_bad_key_is_what_object_store_refuses() -> None:
    assert all(bad_key(k) for k in ("a//b", "a/../b", "./a", "a/", "/a", ""))
    assert not any(bad_key(k) for k in ("a/b", "a/..b/c", "a/.hidden", "m00000-000000.safetensors"))


def test_readers_read_a_run_beside_foreign_keys_and_name_them(moto: MotoServer, moto_bucket: str) -> None:
    env = moto.env()
    run = write_synthetic_run(S3Store(f"s3://{moto_bucket}", env=env), "run", ["h"], files=3)
    for key in ODD:  # as another tool would write them (boto3 sends the key as it is)
        moto.client().put_object(Bucket=moto_bucket, Key=key, Body=b"odd")
    uri = f"s3://{moto_bucket}/run/h"
    with pytest.warns(UserWarning, match="skipping 3 object"):
        cache = RCache(uri, store_options={"env": env})
    assert torch.equal(torch.cat(list(cache)), run.tensor("h"))
    foreign = cache.foreign_objects
    # Named by URL; `url()` joins the key's parts, so run/h//y shows as run/h/y (the `..` stays).
    assert len(foreign) == 3 and f"s3://{moto_bucket}/run/h/../x" in foreign
    assert set(foreign.values()) == {"a key with an empty, . or .. segment"}
    with pytest.warns(UserWarning, match="skipping 3 object"):
        loader = TokenLoader(uri, batch_tokens=16, drop_last=False, store_options={"env": env})
    assert sum(b.shape[0] for b in loader) == int((run.tensor("h", "positions") >= 0).sum())


@pytest.mark.slow
def test_raw_listing_pages_past_a_thousand_keys(moto: MotoServer, moto_bucket: str) -> None:
    """ListObjectsV2 answers 1,000 keys a page: the raw listing follows the continuation token."""
    client = moto.client()
    keys = [f"p/k{i:04d}" for i in range(1001)] + ["p//odd"]
    for k in keys:
        client.put_object(Bucket=moto_bucket, Key=k, Body=b"")
    env = moto.env()
    raw = RawS3(
        env["S3_ENDPOINT_URL"], "us-east-1", moto_bucket, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    )
    prefixes, objects = raw.list_keys("p/", delimiter=False)
    assert prefixes == [] and sorted(k for k, _ in objects) == sorted(keys)
    entries = S3Store(f"s3://{moto_bucket}", env=env).list("p")
    assert len(entries) == 1002 and [e.key for e in entries if e.kind == "badkey"] == ["p//odd"]
