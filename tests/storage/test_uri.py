"""storage/uri.py: the one URI parser: local paths and file:// become absolute paths, s3:// a bucket and a
clean prefix, everything else one ConfigError that names the accepted forms."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from activault.errors import ConfigError
from activault.storage.uri import StoreURI, is_s3, parse_uri


@pytest.mark.parametrize(
    "uri,bucket,prefix",
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://bucket/runs", "bucket", "runs"),
        ("s3://bucket/a/b/c/", "bucket", "a/b/c"),
        ("s3://bucket//a/b//", "bucket", "a/b"),
        ("s3://my.bucket-1/x", "my.bucket-1", "x"),
    ],
)
def test_s3_uris_are_a_bucket_and_a_prefix_without_edge_slashes(uri, bucket, prefix):
    parsed = parse_uri(uri)
    assert parsed == StoreURI("s3", bucket, prefix)
    assert str(parsed) == f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
    assert parse_uri(str(parsed)) == parsed, "the printed form parses to the same URI"


def test_local_paths_become_absolute_and_file_uris_are_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cases = {
        "vault": tmp_path / "vault",
        "./vault/run": tmp_path / "vault/run",
        str(tmp_path / "abs"): tmp_path / "abs",
        "~/v": tmp_path / "home/v",
        "~": tmp_path / "home",
        f"file://{tmp_path}/f": tmp_path / "f",
        "file://rel": tmp_path / "rel",
        Path("as/path"): tmp_path / "as/path",
    }
    for uri, path in cases.items():
        parsed = parse_uri(uri)
        assert parsed == StoreURI("file", "", path.as_posix()), uri
        assert Path(parsed.path).is_absolute() and str(parsed) == parsed.path
        assert parse_uri(str(parsed)) == parsed


def test_the_parsed_uri_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_uri("s3://b/p").bucket = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "garbage,message",
    [
        ("", "empty storage path"),
        ("file://", "empty storage path"),
        ("s3://", "storage URI 's3://' names no bucket"),
        ("s3:///prefix", "storage URI 's3:///prefix' names no bucket"),
        ("s3:////", "names no bucket"),
        ("ftp://host/x", "unsupported storage scheme 'ftp' in 'ftp://host/x'"),
        ("http://127.0.0.1:9000/bucket", "unsupported storage scheme 'http'"),
        ("gs://bucket/x", "unsupported storage scheme 'gs'"),
        ("S3://bucket/x", "unsupported storage scheme 'S3'"),  # schemes are spelled as documented
        ("file://s3://bucket", "unsupported storage scheme 's3'"),
        ("file://ftp://x", "unsupported storage scheme 'ftp'"),
        ("://x", "unsupported storage scheme ''"),
        ("/tmp/a\0b", "'/tmp/a\\x00b' holds a NUL character"),
        ("file:///tmp/\0", "holds a NUL character"),
        ("s3://bucket/run\0x", "holds a NUL character"),
        ("s3://buck\0et", "holds a NUL character"),
    ],
)
def test_garbage_uris_are_one_config_error(garbage, message):
    with pytest.raises(ConfigError) as e:
        parse_uri(garbage)
    assert message in str(e.value)
    assert "s3://BUCKET" in str(e.value), "names the accepted forms"


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("s3://b", True),
        ("s3://b/p", True),
        ("s3://", True),  # it names object storage, if badly: parse_uri says what is wrong
        ("S3://b", False),
        ("/data/s3://b", False),
        ("vault", False),
        ("file:///x", False),
        (Path("s3://b"), False),  # a Path collapses "//": it is a local path by then
        (b"s3://b", False),
        (None, False),
        (5, False),
    ],
)
def test_is_s3(uri, expected):
    assert is_s3(uri) is expected


def test_a_local_path_is_taken_as_written_not_resolved_through_links(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert parse_uri(tmp_path / "alias").path == (tmp_path / "alias").as_posix()
