"""Storage URIs: the one parser every command, reader and store uses.

A plain path or `file://PATH` is the local store; `s3://bucket/prefix` is object storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from activault.errors import ConfigError

S3 = "s3://"


@dataclass(frozen=True)
class StoreURI:
    scheme: Literal["file", "s3"]
    bucket: str  # "" for the local store
    path: str  # local: an absolute path; s3: the prefix inside the bucket, no leading or trailing "/"

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}" + (f"/{self.path}" if self.path else "")
        return self.path


def is_s3(uri: object) -> bool:
    """Whether `uri` (a string or path) names object storage rather than a local folder."""
    return isinstance(uri, str | Path) and str(uri).startswith(S3)


def parse_uri(uri: str | Path) -> StoreURI:
    """Parse a store URI; an unknown scheme, an s3 URI without a bucket or a NUL is a ConfigError."""
    text = str(uri)
    if "\0" in text:
        raise ConfigError(
            f"storage URI {text!r} holds a NUL character, which no path or bucket can; "
            "give a folder, file://PATH or s3://BUCKET/PREFIX without it"
        )
    if text.startswith(S3):
        bucket, _, prefix = text[len(S3) :].partition("/")
        if not bucket:
            raise ConfigError(f"storage URI {text!r} names no bucket; write s3://BUCKET[/PREFIX]")
        return StoreURI("s3", bucket, prefix.strip("/"))
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"unsupported storage scheme {scheme!r} in {text!r}; use a local path, file://PATH or s3://BUCKET/PREFIX"
        )
    if not text:
        raise ConfigError("empty storage path; give a folder, file://PATH or s3://BUCKET/PREFIX")
    return StoreURI("file", "", Path(text).expanduser().absolute().as_posix())
