"""S3-compatible object storage through obstore (Rust `object_store`: releases the GIL, parallel parts).

Every request is retried by object_store on 5xx, 429 (throttling), timeouts and connection resets,
with exponential backoff and jitter; this covers single PUTs and each part of a multipart upload
(tests/test_s3.py proves it through a fault-injecting proxy). A multipart upload that still fails
is aborted by object_store (DELETE ?uploadId) before the error reaches us. Secrets never leave the
client: messages name the endpoint, bucket and key only.
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import BaseError
from obstore.exceptions import NotFoundError as _ObNotFound
from obstore.store import S3Store as _ObS3Store

from activault.errors import ConfigError, NotFoundError, StorageError
from activault.storage.base import Buffer, Entry, Store, as_parts, join
from activault.storage.uri import parse_uri

# Parts of 16 MiB: one connection to AWS moves ~90 MB/s, so 8 parts in flight fill a 5 Gbit/s NIC.
# Memory per upload is bounded by PART_CONCURRENCY parts in flight (128 MiB) besides the object.
PART_SIZE = 16 << 20
PART_CONCURRENCY = 8
MULTIPART_THRESHOLD = 32 << 20
# Data requests: a 16 MiB part at a slow 2 MB/s still finishes in 8 s. object_store's backoff is
# random in [init, last * base] (decorrelated jitter), so 10 retries can pass in 2 s; 30 retries
# capped at 15 s each and 5 minutes in all ride out a server restart or a minute of throttling.
TIMEOUT = "120s"
CONNECT_TIMEOUT = "5s"
MAX_RETRIES = 30
RETRY_TIMEOUT = timedelta(minutes=5)
# check() must answer in seconds: an unreachable endpoint is a configuration error, not an outage.
CHECK_TIMEOUT = "10s"
CHECK_CONNECT_TIMEOUT = "2s"
CHECK_RETRIES = 1
# Signed PUTs already carry the body's SHA-256 (x-amz-content-sha256: S3 refuses a body that does
# not match it); naming the algorithm also stores it with the object (x-amz-checksum-sha256) from
# the same digest, so it costs no second hash. AWS_CHECKSUM_ALGORITHM=none turns it off for an
# endpoint that refuses the header.
CHECKSUM = "sha256"

def s3_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    """S3 connection settings from the environment (the original's names and the standard AWS_* ones)."""
    env = dict(os.environ if env is None else env)
    out = {}
    endpoint = env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["endpoint"] = endpoint
    for key, names in {
        "access_key_id": ("AWS_ACCESS_KEY_ID",),
        "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
        "session_token": ("AWS_SESSION_TOKEN",),
        "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
        "checksum_algorithm": ("AWS_CHECKSUM_ALGORITHM",),
    }.items():
        for n in names:
            if env.get(n):
                out[key] = env[n]
                break
    return out



def _retry(max_retries: int, total: timedelta) -> dict[str, Any]:
    # object_store's backoff is "decorrelated jitter" (AWS's recommendation): random in [init, last*base].
    return {
        "max_retries": max_retries,
        "retry_timeout": total,
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15), "base": 2},
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    for noise in ("Generic S3 error: ", "Generic S3 error:"):
        line = line.replace(noise, "")
    return line.strip()


class S3Store(Store):
    """`s3://bucket/prefix` on any S3-compatible endpoint (AWS, R2, MinIO, Ceph, moto, s3rver, ...)."""

    def __init__(
        self,
        uri: str,
        *,
        env: dict[str, str] | None = None,
        unsigned: bool | None = None,
        max_retries: int | None = None,
        timeout: str | None = None,
        part_size: int | None = None,
        multipart_threshold: int | None = None,
        part_concurrency: int | None = None,
        **_: Any,
    ):
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise ConfigError(f"{uri!r} is not an s3://BUCKET[/PREFIX] URI")
        self.bucket, self.prefix = parsed.bucket, parsed.path
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        settings = s3_settings(env)
        self.endpoint = settings.get("endpoint", "")
        self.region = settings.get("region", "us-east-1")
        self._has_key = "access_key_id" in settings
        self._has_secret = "secret_access_key" in settings
        if unsigned is None:
            unsigned = not self._has_key
        self.unsigned = unsigned
        # Module constants are read here, not as defaults, so tests and benchmarks can tune them.
        self.part_size = part_size or PART_SIZE
        self.multipart_threshold = multipart_threshold or MULTIPART_THRESHOLD
        self.part_concurrency = part_concurrency or PART_CONCURRENCY
        self._config: dict[str, Any] = dict(settings)
        self._config["region"] = self.region
        if unsigned:
            self._config = {k: v for k, v in self._config.items() if k in ("endpoint", "region")}
            self._config["skip_signature"] = True
        elif self._config.setdefault("checksum_algorithm", CHECKSUM).lower() == "none":
            del self._config["checksum_algorithm"]
        self._store = self._client(timeout or TIMEOUT, CONNECT_TIMEOUT, _retry(max_retries if max_retries is not None else MAX_RETRIES, RETRY_TIMEOUT))

    def _client(self, timeout: str, connect_timeout: str, retry: dict[str, Any]) -> _ObS3Store:
        client: dict[str, Any] = {"timeout": timeout, "connect_timeout": connect_timeout}
        if self.endpoint.startswith("http://"):
            client["allow_http"] = True
        return _ObS3Store(
            self.bucket,
            prefix=self.prefix or None,
            client_options=client,  # type: ignore[arg-type]
            retry_config=retry,  # type: ignore[arg-type]
            **self._config,
        )

    def __repr__(self) -> str:  # never the credentials
        return f"S3Store({self.uri!r}, endpoint={self.endpoint or 'AWS'!r})"

    @property
    def where(self) -> str:
        return self.endpoint or f"AWS ({self.region})"

    def _err(self, e: Exception, key: str, action: str) -> StorageError:
        where = self.url(key)
        if isinstance(e, (_ObNotFound, FileNotFoundError)):
            return NotFoundError(f"{where} does not exist")
        return StorageError(f"cannot {action} {where} at {self.where}: {_first_line(e)}")

    def check(self, write: bool = False) -> None:
        """Fail in seconds with one precise message: credentials, endpoint, bucket, write access."""
        if self._has_key and not self._has_secret:
            raise StorageError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both (or neither, to read a public bucket)")
        if self._has_secret and not self._has_key:
            raise StorageError("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both")
        if write and self.unsigned:
            raise StorageError(
                f"no S3 credentials for writing to {self.uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and S3_ENDPOINT_URL for a non-AWS endpoint), or pass --storage PATH for the local store"
            )
        fast = self._client(CHECK_TIMEOUT, CHECK_CONNECT_TIMEOUT, _retry(CHECK_RETRIES, timedelta(seconds=10)))
        probe = ".activault-write-check"
        try:
            obstore.list_with_delimiter(fast, None)
            if write:
                obstore.put(fast, probe, b"ok", use_multipart=False)
                obstore.delete(fast, probe)
        except (BaseError, OSError) as e:
            raise self._check_error(e) from None

    def _check_error(self, e: BaseException) -> StorageError:
        text = str(e)
        low = text.lower()
        if "NoSuchBucket" in text or "bucket does not exist" in low or "specified bucket" in low:
            return StorageError(
                f"bucket {self.bucket!r} does not exist at {self.where}: create it, or name an existing one "
                "with S3_BUCKET_NAME, data_config.bucket_name or --storage s3://BUCKET"
            )
        # Status codes as whole words: a port such as 41403 in the message is not a 403.
        if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")) or re.search(
            r"\b(401|403)\b(?!\.)", re.sub(r"https?://\S+", "", text)
        ):
            return StorageError(
                f"{self.where} refused access to s3://{self.bucket} with these credentials: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"
            )
        if any(s in low for s in ("connect", "dns", "timed out", "timeout", "reset", "refused", "error sending request")):
            return StorageError(
                f"cannot reach the S3 endpoint {self.where}: {_first_line(e)}; check S3_ENDPOINT_URL "
                "(http:// or https://, host and port) and the network"
            )
        return StorageError(f"cannot use s3://{self.bucket} at {self.where}: {_first_line(e)}")

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        parts = as_parts(data)
        total = sum(p.nbytes for p in parts)
        try:
            if total <= self.multipart_threshold:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                obstore.put(self._store, key, body, use_multipart=False)
            else:
                # Parts upload in parallel, each retried on its own; on failure object_store aborts
                # the upload, so no hidden parts are left to pay for.
                obstore.put(
                    self._store,
                    key,
                    iter(parts),
                    use_multipart=True,
                    chunk_size=self.part_size,
                    max_concurrency=self.part_concurrency,
                )
        except (BaseError, OSError) as e:
            err = self._err(e, key, "upload")
            raise StorageError(f"{err}; fix the cause and run the same command again to resume") from None

    def get(self, key: str) -> memoryview:
        try:
            return memoryview(obstore.get(self._store, key).bytes())
        except (BaseError, OSError) as e:
            raise self._err(e, key, "download") from None

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        try:
            return memoryview(obstore.get_range(self._store, key, start=start, end=end))
        except (BaseError, OSError) as e:
            raise self._err(e, key, "download") from None

    def get_ranges(self, key: str, starts: list[int], ends: list[int]) -> list[memoryview]:
        try:
            return [memoryview(b) for b in obstore.get_ranges(self._store, key, starts=starts, ends=ends)]
        except (BaseError, OSError) as e:
            raise self._err(e, key, "download") from None

    def size(self, key: str) -> int | None:
        try:
            return int(obstore.head(self._store, key)["size"])
        except (_ObNotFound, FileNotFoundError):
            return None
        except (BaseError, OSError) as e:
            raise self._err(e, key, "stat") from None

    def list(self, prefix: str = "") -> list[Entry]:
        out = []
        try:
            for chunk in obstore.list(self._store, prefix.strip("/") or None):
                for meta in chunk:
                    out.append(Entry(meta["path"], int(meta["size"])))
        except (BaseError, OSError) as e:
            raise self._err(e, prefix, "list") from None
        return sorted(out, key=lambda e: e.key)

    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[Entry]]:
        try:
            res = obstore.list_with_delimiter(self._store, prefix.strip("/") or None)
        except (BaseError, OSError) as e:
            raise self._err(e, prefix, "list") from None
        dirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in res["common_prefixes"])
        files = sorted((Entry(m["path"], int(m["size"])) for m in res["objects"]), key=lambda e: e.key)
        return dirs, files

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except (_ObNotFound, FileNotFoundError):
            pass
        except (BaseError, OSError) as e:
            raise self._err(e, key, "delete") from None

    def url(self, key: str = "") -> str:
        return f"s3://{join(self.bucket, self.prefix, key)}"
