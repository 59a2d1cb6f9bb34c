"""S3-compatible object storage through obstore (Rust `object_store`: releases the GIL, parallel parts).

Retries come in two layers. object_store retries each request (a single PUT, each part of a multipart
upload) a couple of times within a second on 5xx, 429, timeouts and connection resets: a blip passes
unseen. Anything longer comes back to `S3Store._call`, the one loop every operation goes through: it
retries with backoff within a budget (ACTIVAULT_S3_MAX_RETRIES attempts, ACTIVAULT_S3_RETRY_TIMEOUT
seconds, or the store options `max_retries` and `retry_timeout`), logs what it is retrying and how
many attempts failed once that has lasted a few seconds, and ends with one message naming the
endpoint and the last error. tests/storage/test_s3.py proves both through a fault-injecting proxy. A
multipart upload that fails is aborted by object_store (DELETE ?uploadId) before it comes back.

An opened object (`S3Store.open`) is read from one version: every ranged GET carries If-Match with
the ETag of the first answer (or of a HEAD), so an overwrite in between is a 412 (ObjectChanged,
never retried), not new bytes at old offsets.

Keys that object_store cannot name (`..`, `.` or empty segments; activault never writes them) are
listed and deleted through plain signed requests (storage/s3keys.py) as "badkey" entries.
Secrets never leave the client: messages name the endpoint, bucket and key only.
"""

from __future__ import annotations

import builtins
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, InvalidPathError, PreconditionError
from obstore.exceptions import NotFoundError as _ObNotFound
from obstore.store import S3Store as _ObS3Store

from activault.errors import ConfigError, NotFoundError, StorageError
from activault.storage.base import LOCKS, Buffer, Entry, ObjectChanged, ObjectHandle, Store, as_parts, join
from activault.storage.s3keys import RawS3, RawS3Error, bad_key
from activault.storage.uri import parse_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

# Parts of 16 MiB: one connection to AWS moves ~90 MB/s, so 8 parts in flight fill a 5 Gbit/s NIC.
# Memory per upload is bounded by PART_CONCURRENCY parts in flight (128 MiB) besides the object.
PART_SIZE = 16 << 20
PART_CONCURRENCY = 8
MULTIPART_THRESHOLD = 32 << 20
# Ranged reads into a caller's buffer arrive in pieces of this size. A range fetched whole is a new
# allocation of its size, which glibc maps afresh (over 32 MiB, always) and the kernel faults in
# page by page; pieces of 1 MiB come from the heap, which reuses them (docs/benchmarks.md:
# Reading has the faults and rates).
READ_CHUNK = 1 << 20
# Data requests: a 16 MiB part at a slow 2 MB/s still finishes in 8 s.
TIMEOUT = "120s"
CONNECT_TIMEOUT = "5s"
# object_store's own retries of one request: 2 within ~1 s absorb a dropped connection quietly.
INNER_RETRIES = 2
# Then _call's: 30 attempts, backoff doubling from 0.25 s up to 15 s, 5 minutes in all, ride out a
# server restart or a minute of throttling. Defaults for ACTIVAULT_S3_MAX_RETRIES / _RETRY_TIMEOUT.
MAX_RETRIES = 30
RETRY_TIMEOUT = timedelta(minutes=5)
MAX_BACKOFF_S = 15.0
# Say that we are retrying once it has lasted this long, then at most every NOTICE_EVERY_S.
NOTICE_AFTER_S = 3.0
NOTICE_EVERY_S = 5.0
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
        "skip_signature": ("AWS_SKIP_SIGNATURE",),  # object_store's name: anonymous requests, asked for
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
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1), "base": 2},
    }


def retry_budget(
    env: dict[str, str] | None = None, max_retries: int | None = None, retry_timeout: float | timedelta | None = None
) -> tuple[int, float]:
    """(attempts after the first, seconds) of `_call`: the options, else the environment, else the defaults."""
    env = dict(os.environ if env is None else env)
    if max_retries is None:
        max_retries = int(_env_number(env, "ACTIVAULT_S3_MAX_RETRIES", MAX_RETRIES, integer=True))
    if retry_timeout is None:
        retry_timeout = _env_number(env, "ACTIVAULT_S3_RETRY_TIMEOUT", RETRY_TIMEOUT.total_seconds())
    seconds = retry_timeout.total_seconds() if isinstance(retry_timeout, timedelta) else float(retry_timeout)
    if max_retries < 0 or seconds < 0:
        raise ConfigError(f"S3 retry budget must not be negative (max_retries={max_retries}, retry_timeout={seconds})")
    return max_retries, seconds


def _env_number(env: dict[str, str], name: str, default: float, integer: bool = False) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text.removesuffix("s"))
    except ValueError:
        raise ConfigError(
            f"{name}={text!r} is not {'a whole number' if integer else 'a number of seconds'}; "
            f"set e.g. {name}={int(default)} or unset it"
        ) from None
    if value < 0:
        raise ConfigError(f"{name}={text!r} is negative; set e.g. {name}={int(default)} or unset it")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    for noise in ("Generic S3 error: ", "Generic S3 error:"):
        line = line.replace(noise, "")
    return line.strip()


def _transient(e: BaseException) -> bool:
    """Whether a request that failed may succeed if sent again: 5xx, 408, 429, or no answer."""
    if isinstance(e, (_ObNotFound, FileNotFoundError, InvalidPathError, ValueError, TypeError)):
        return False
    if isinstance(e, (PreconditionError, ObjectChanged)):  # 412 or another ETag: a new version, for good
        return False
    text = str(e)
    status = e.status if isinstance(e, RawS3Error) and e.status else None
    if status is None and (m := re.search(r"status code: (\d{3})", text)):
        status = int(m.group(1))
    if status is not None:
        return status >= 500 or status in (408, 429)
    low = text.lower()
    return any(
        s in low for s in ("error sending request", "timed out", "timedout", "connection", "reset", "broken pipe")
    )


def _no_such_bucket(text: str) -> bool:
    """Whether the endpoint answered NoSuchBucket (its code is in the XML body of the 404)."""
    return "<Code>NoSuchBucket</Code>" in text


def _denied(text: str) -> bool:
    """Whether a refusal is about the credentials (status codes as whole words, not in a URL's port)."""
    if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
        return True
    return re.search(r"\b(401|403)\b(?!\.)", re.sub(r"https?://\S+", "", text)) is not None


def _fix(e: BaseException, unsigned: bool = False) -> str:
    """What to do about a request the endpoint refused for good (not retried): the fix of a known
    cause, else to fix the one the endpoint named."""
    text = str(e)
    if unsigned and _denied(text):
        return (
            "the bucket refuses anonymous (unsigned) requests: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and drop AWS_SKIP_SIGNATURE / unsigned=True)"
        )
    if "non-partial response" in text.lower():
        return (
            "the endpoint answered a ranged read with the whole object, and reading needs ranges: serve the "
            "run from an S3 server that honours Range (AWS, MinIO, R2, Ceph) or from a local copy"
        )
    if _denied(text):
        return (
            "the endpoint refused these credentials for this object: check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and the key's permissions on the bucket"
        )
    return "fix that"


def _cause(e: BaseException) -> str:
    """The short reason of a failed request: '503 Service Unavailable (SlowDown)', 'Connection refused'."""
    text = str(e)
    if m := re.search(r"status code: (\d{3}[^:<\n]*)", text):
        code = re.search(r"<Code>([^<]+)</Code>", text)
        return m.group(1).strip() + (f" ({code.group(1)})" if code else "")
    if m := re.search(r'message: "([^"]+)"', text):
        return m.group(1)
    if "TimedOut" in text or "timed out" in text.lower():
        return "no answer in time (timed out)"
    return _first_line(e)


def _half_set(has_key: bool) -> str:
    given, absent = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")[:: 1 if has_key else -1]
    return f"{given} is set but {absent} is not: set both (or, for a public bucket, AWS_SKIP_SIGNATURE=true)"


def _no_credentials(uri: str, where: str) -> str:
    """What is missing to reach `uri`, and the ways to provide it."""
    home = os.path.expanduser("~/.aws")
    unread = [n for n in ("AWS_PROFILE",) if os.environ.get(n)]
    unread += [p for p in (f"{home}/credentials", f"{home}/config") if os.path.isfile(p)]
    note = (
        f" ({' and '.join(unread)} are not read: export the keys, e.g. "
        '`eval "$(aws configure export-credentials --format env)"`)'
        if unread
        else ""
    )
    return (
        f"no S3 credentials for {uri} at {where}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set{note}; "
        "set both in the environment (and AWS_SESSION_TOKEN for temporary credentials) or in the store option "
        "env (store_options={'env': {...}}), or, for a public bucket, ask for anonymous access with "
        "AWS_SKIP_SIGNATURE=true or the store option unsigned=True"
    )


def _whole(least: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _seconds(v: Any) -> bool:
    return isinstance(v, timedelta) or (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0)


# S3Store's options: what each accepts (None is always the default).
_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "env": (lambda v: isinstance(v, Mapping) and all(isinstance(x, str) for x in (*v, *v.values())), "str -> str"),
    "unsigned": (lambda v: isinstance(v, bool), "True or False"),
    "max_retries": (_whole(0), "a whole number >= 0"),
    "retry_timeout": (_seconds, "seconds >= 0 or a timedelta"),
    "timeout": (lambda v: isinstance(v, str) and bool(v.strip()), 'a duration such as "120s"'),
    "part_size": (_whole(5 << 20), "a whole number of bytes >= 5 MiB (S3's minimum part)"),
    "multipart_threshold": (_whole(1), "a whole number of bytes >= 1"),
    "part_concurrency": (_whole(1), "a whole number >= 1"),
}


def _check_options(options: dict[str, Any]) -> None:
    """A ConfigError naming the first S3 store option of the wrong type or range."""
    for name, value in options.items():
        ok, accepted = _OPTIONS[name]
        if value is not None and not ok(value):
            shown = "{...}" if name == "env" else repr(value)  # env may hold credentials
            raise ConfigError(
                f"{name}={shown} is not accepted: the S3 store option {name} must be {accepted} (or None: the default)"
            )


class S3Store(Store):
    """`s3://bucket/prefix` on any S3-compatible endpoint (AWS, R2, MinIO, Ceph, moto, s3rver, ...)."""

    def __init__(
        self,
        uri: str,
        *,
        env: dict[str, str] | None = None,
        unsigned: bool | None = None,
        max_retries: int | None = None,
        retry_timeout: float | timedelta | None = None,
        timeout: str | None = None,
        part_size: int | None = None,
        multipart_threshold: int | None = None,
        part_concurrency: int | None = None,
    ):
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise ConfigError(f"{uri!r} is not an s3://BUCKET[/PREFIX] URI")
        _check_options({k: v for k, v in locals().items() if k in _OPTIONS})  # the keyword arguments
        self.bucket, self.prefix = parsed.bucket, parsed.path
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        settings = s3_settings(env)
        self.endpoint = settings.get("endpoint", "")
        self.region = settings.get("region", "us-east-1")
        self._has_key = "access_key_id" in settings
        self._has_secret = "secret_access_key" in settings
        asked = settings.pop("skip_signature", "").strip().lower() in ("1", "true", "yes", "on")
        anonymous = asked if unsigned is None else unsigned
        if self._has_key != self._has_secret and not anonymous:  # obstore would refuse it with a traceback
            raise StorageError(_half_set(self._has_key))
        # No credentials and no request for anonymous access: refused at the first request, not
        # sent unsigned (a private bucket answers 403) or signed by nothing (object_store then asks
        # the EC2 metadata service, retrying for minutes).
        self._missing = None if anonymous or self._has_key else _no_credentials(self.uri, self.where)
        unsigned = anonymous or not self._has_key
        self.unsigned = unsigned
        # Module constants are read here, not as defaults, so tests and benchmarks can tune them.
        self.part_size = part_size or PART_SIZE
        self.multipart_threshold = multipart_threshold or MULTIPART_THRESHOLD
        self.part_concurrency = part_concurrency or PART_CONCURRENCY
        self._config: dict[str, Any] = dict(settings)
        self._config["region"] = self.region
        self._config["skip_signature"] = unsigned  # also over AWS_SKIP_SIGNATURE, which obstore reads itself
        if unsigned:
            self._config = {k: v for k, v in self._config.items() if k in ("endpoint", "region", "skip_signature")}
        elif self._config.setdefault("checksum_algorithm", CHECKSUM).lower() == "none":
            del self._config["checksum_algorithm"]
        self.max_retries, self.retry_timeout = retry_budget(env, max_retries, retry_timeout)
        self._store = self._client(timeout or TIMEOUT, CONNECT_TIMEOUT, _retry(INNER_RETRIES, timedelta(seconds=5)))
        creds = (
            {} if unsigned else {k: settings.get(k) for k in ("access_key_id", "secret_access_key", "session_token")}
        )
        self._raw = RawS3(self.endpoint, self.region, self.bucket, **creds)
        self._notice_lock = threading.Lock()
        self._last_notice = -NOTICE_EVERY_S

    def _client(self, timeout: str, connect_timeout: str, retry: dict[str, Any]) -> _ObS3Store:
        client: dict[str, Any] = {"timeout": timeout, "connect_timeout": connect_timeout}
        if self.endpoint.startswith("http://"):
            client["allow_http"] = True
        try:
            return _ObS3Store(
                self.bucket,
                prefix=self.prefix or None,
                client_options=client,  # type: ignore[arg-type]
                retry_config=retry,  # type: ignore[arg-type]
                **self._config,
            )
        except BaseError as e:  # obstore also reads AWS_* from the environment itself
            raise StorageError(f"cannot set up S3 for {self.uri}: {_first_line(e)}; fix the AWS_* settings") from None

    def __repr__(self) -> str:  # never the credentials
        return f"S3Store({self.uri!r}, endpoint={self.endpoint or 'AWS'!r})"

    @property
    def where(self) -> str:
        return self.endpoint or f"AWS ({self.region})"

    def _no_bucket(self) -> str:
        """The bucket is missing: where, and the one command that creates it."""
        client, extra = f"'s3', region_name={self.region!r}", ""
        mb = f" --endpoint-url {self.endpoint}" if self.endpoint else f" --region {self.region}"
        if self.endpoint:
            client = f"'s3', endpoint_url={self.endpoint!r}"
        elif self.region != "us-east-1":  # AWS wants the region named again outside us-east-1
            extra = f", CreateBucketConfiguration={{'LocationConstraint': {self.region!r}}}"
        return (
            f"bucket {self.bucket!r} does not exist at {self.where}: create it with "
            f'`aws s3 mb s3://{self.bucket}{mb}` or `python -c "import boto3; boto3.client({client})'
            f'.create_bucket(Bucket={self.bucket!r}{extra})"`, or, if the name is mistyped, name an '
            "existing bucket (S3_BUCKET_NAME, data_config.bucket_name or --storage s3://BUCKET/PREFIX)"
        )

    def _err(self, e: Exception, key: str, action: str, again: str) -> StorageError:
        where = self.url(key)
        if _no_such_bucket(str(e)):  # a 404 like a missing key's, but no key of this bucket exists
            return StorageError(f"cannot {action} {where}: {self._no_bucket()}; then {again}")
        if isinstance(e, (_ObNotFound, FileNotFoundError)):
            return NotFoundError(f"{where} does not exist")
        if isinstance(e, ObjectChanged):
            return e
        if isinstance(e, PreconditionError):
            return ObjectChanged(f"{where} was replaced while it was read (412 Precondition Failed on If-Match)")
        fix = _fix(e, self.unsigned)
        return StorageError(f"cannot {action} {where} at {self.where}: {_first_line(e)}; {fix}, then {again}")

    def _call(self, action: str, key: str, fn: Callable[[], T], again: str = "try again") -> T:
        """`fn()`, retried on transient errors within the budget; every store operation goes through
        here. `again` ends each error's fix: what to do once the cause is fixed."""
        if self._missing:
            raise StorageError(self._missing)
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified, then re-raised as a StorageError
                if not _transient(e):
                    raise self._err(e, key, action, again) from None
                elapsed = time.monotonic() - start
                if attempt > self.max_retries or elapsed >= self.retry_timeout:
                    raise StorageError(
                        f"cannot {action} {self.url(key)}: the S3 endpoint {self.where} failed {attempt} "
                        f"attempt(s) in {elapsed:.0f} s, last with: {_cause(e)}; check the endpoint and the network "
                        f"(ACTIVAULT_S3_RETRY_TIMEOUT={self.retry_timeout:g} and ACTIVAULT_S3_MAX_RETRIES="
                        f"{self.max_retries} set how long to retry), then {again}"
                    ) from None
                self._notice(f"{action} {self.url(key)}", attempt, elapsed, e)
                # Backoff doubling from 0.25 s, with jitter; the last attempt comes at the deadline.
                delay = min(MAX_BACKOFF_S, 0.25 * 2 ** min(attempt - 1, 6)) * random.uniform(0.5, 1.0)
                time.sleep(min(delay, self.retry_timeout - elapsed))

    def _notice(self, what: str, attempt: int, elapsed: float, e: BaseException) -> None:
        """Log a retry once retrying has lasted NOTICE_AFTER_S, at most every NOTICE_EVERY_S per store."""
        now = time.monotonic()
        with self._notice_lock:
            if elapsed < NOTICE_AFTER_S or now - self._last_notice < NOTICE_EVERY_S:
                return
            self._last_notice = now
        log.warning(
            "S3 at %s: %s failed %d time(s) in %.0f s (last: %s); retrying for up to %.0f s more (Ctrl-C to stop)",
            self.where,
            what,
            attempt,
            elapsed,
            _cause(e),
            max(0.0, self.retry_timeout - elapsed),
        )

    def check(self, write: bool = False) -> None:
        """Fail in seconds with one precise message: credentials, endpoint, bucket, write access."""
        if write and self.unsigned:
            raise StorageError(
                f"no S3 credentials for writing to {self.uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and S3_ENDPOINT_URL for a non-AWS endpoint), or pass --storage PATH for the local store"
            )
        if self._missing:
            raise StorageError(self._missing)
        fast = self._client(CHECK_TIMEOUT, CHECK_CONNECT_TIMEOUT, _retry(CHECK_RETRIES, timedelta(seconds=10)))
        probe = ".activault-write-check"
        try:
            try:
                obstore.list_with_delimiter(fast, None)
            except InvalidPathError:  # the server answered; a foreign key at the top is listed elsewhere
                pass
            if write:
                obstore.put(fast, probe, b"ok", use_multipart=False)
                obstore.delete(fast, probe)
        except (BaseError, OSError) as e:
            raise self._check_error(e) from None

    def _check_error(self, e: BaseException) -> StorageError:
        text = str(e)
        low = text.lower()
        if "NoSuchBucket" in text or "bucket does not exist" in low or "specified bucket" in low:
            return StorageError(self._no_bucket())
        if _denied(text):  # a port such as 41403 in the message is not a 403
            return StorageError(
                f"{self.where} refused access to s3://{self.bucket} "
                "with these credentials: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"
            )
        if any(
            s in low for s in ("connect", "dns", "timed out", "timeout", "reset", "refused", "error sending request")
        ):
            return StorageError(
                f"cannot reach the S3 endpoint {self.where}: {_first_line(e)}; check S3_ENDPOINT_URL "
                "(http:// or https://, host and port) and the network"
            )
        return StorageError(f"cannot use s3://{self.bucket} at {self.where}: {_first_line(e)}")

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        parts = as_parts(data)
        total = sum(p.nbytes for p in parts)

        def send() -> None:
            if total <= self.multipart_threshold:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                obstore.put(self._store, key, body, use_multipart=False)
            else:
                # Parts upload in parallel, each retried on its own; on failure object_store aborts
                # the upload, so no hidden parts are left to pay for (and _call starts it again).
                obstore.put(
                    self._store,
                    key,
                    iter(parts),
                    use_multipart=True,
                    chunk_size=self.part_size,
                    max_concurrency=self.part_concurrency,
                )

        self._call("upload", key, send, again="run the same command again to resume")

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        # If-None-Match: * to create, If-Match: {the ETag read} to replace (object_store's
        # conditional_put="etag", its default). A store that ignores these headers (old MinIO,
        # Ceph before Squid) cannot give this guarantee.
        def attempt() -> bool:
            try:
                if expect is None:
                    obstore.put(self._store, key, data, mode="create", use_multipart=False)
                    return True
                current = obstore.get(self._store, key)
                if bytes(current.bytes()) != expect:
                    return False
                meta: dict[str, Any] = dict(current.meta)
                version = {k: meta[k] for k in ("e_tag", "version") if meta.get(k) is not None}
                if not version:
                    raise StorageError(f"{self.where} sends no ETag, so no conditional replace")
                mode: Any = version  # an UpdateVersion
                obstore.put(self._store, key, data, mode=mode, use_multipart=False)
                return True
            except (AlreadyExistsError, PreconditionError, _ObNotFound, FileNotFoundError):
                return False

        # Progress records and leases: the jobs that write them resume where they stopped.
        return self._call("conditionally write", key, attempt, again="run the same command again to resume")

    def get(self, key: str) -> memoryview:
        return self._call("download", key, lambda: memoryview(obstore.get(self._store, key).bytes()))

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        if end <= start:  # S3 has no empty range (416): nothing to fetch
            return memoryview(b"")
        return self._call(
            "download", key, lambda: memoryview(obstore.get_range(self._store, key, start=start, end=end))
        )

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        """Stream the range into `out` in READ_CHUNK pieces (a retry starts the range again)."""
        return self._read_into(key, offset, out, None)

    def _read_into(self, key: str, offset: int, out: memoryview, version: _S3Object | None) -> int:
        """`read_into`; with `version`, only from that version (If-Match; its answer confirmed
        before any byte is kept)."""
        if not out.nbytes:
            return 0

        def fetch() -> int:
            options: dict[str, Any] = {"range": (offset, offset + out.nbytes)}
            if version is not None and version.version is not None:
                options["if_match"] = version.version
            got = obstore.get(self._store, key, options=options)  # type: ignore[arg-type]
            if version is not None:
                version.confirm(got.meta)
            n = 0
            for chunk in got.stream(min_chunk_size=READ_CHUNK):
                view = memoryview(chunk)[: out.nbytes - n]  # never past `out`, whatever the server sends
                out[n : n + view.nbytes] = view
                n += view.nbytes
                if n == out.nbytes:
                    break
            return n

        return self._call("download", key, fetch)

    def open(self, key: str, size: int | None = None) -> ObjectHandle:
        """The object's version now: its size and ETag from a HEAD, or, given its listed `size`,
        from the first read's answer (no extra request; ObjectChanged if the size differs). Every
        later read sends If-Match with that ETag: a new version is a 412, never mixed bytes."""
        if size is not None:
            return _S3Object(self, key, size, None)
        meta = self._call("stat", key, lambda: obstore.head(self._store, key))
        return _S3Object(self, key, int(meta["size"]), meta.get("e_tag"))

    def size(self, key: str) -> int | None:
        try:
            return int(self._call("stat", key, lambda: obstore.head(self._store, key))["size"])
        except NotFoundError:
            return None

    def list(self, prefix: str = "") -> list[Entry]:
        _, entries = self._call("list", prefix, lambda: self._listing(prefix.strip("/"), delimiter=False))
        return sorted((e for e in entries if LOCKS not in e.key.split("/")), key=lambda e: e.key)

    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[Entry]]:
        prefixes, entries = self._call("list", prefix, lambda: self._listing(prefix.strip("/"), delimiter=True))
        dirs = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes} - {LOCKS})
        return dirs, sorted(entries, key=lambda e: e.key)

    def _listing(self, prefix: str, delimiter: bool) -> tuple[builtins.list[str], builtins.list[Entry]]:
        """(sub-folder prefixes, entries) under `prefix`: object_store's, or, when a key it cannot
        name is there (its listing then fails whole), a plain listing with such keys as "badkey"."""
        try:
            if delimiter:
                res = obstore.list_with_delimiter(self._store, prefix or None)
                return list(res["common_prefixes"]), [Entry(m["path"], int(m["size"])) for m in res["objects"]]
            return [], [
                Entry(m["path"], int(m["size"])) for chunk in obstore.list(self._store, prefix or None) for m in chunk
            ]
        except InvalidPathError:
            pass
        base = join(self.prefix, prefix)
        raw_prefixes, objects = self._raw.list_keys(base + "/" if base else "", delimiter)
        if delimiter:  # a sub-folder with a bad name is shown as the objects it holds
            for p in [p for p in raw_prefixes if bad_key(p.removesuffix("/"))]:
                raw_prefixes.remove(p)
                objects += self._raw.list_keys(p, False)[1]
        cut = len(self.prefix) + 1 if self.prefix else 0
        entries = [Entry(k[cut:], size, "badkey" if bad_key(k[cut:]) else "file") for k, size in objects]
        return [p[cut:] for p in raw_prefixes], entries

    def delete(self, key: str) -> None:
        if bad_key(key):  # object_store refuses the key; a plain DeleteObjects names it in the body
            self._call("delete", key, lambda: self._raw.delete_keys([f"{self.prefix}/{key}" if self.prefix else key]))
            return
        try:
            self._call("delete", key, lambda: obstore.delete(self._store, key))
        except NotFoundError:
            pass

    def url(self, key: str = "") -> str:
        return f"s3://{join(self.bucket, self.prefix, key)}"


class _S3Object(ObjectHandle):
    """One version of an S3 object: its ETag, from the HEAD of `S3Store.open` or the first
    answer, sent as If-Match with every read (a server that ignores it is caught by comparing
    each answer's ETag)."""

    def __init__(self, store: S3Store, key: str, size: int, etag: str | None):
        super().__init__(store.url(key), size, etag)
        self.store, self.key = store, key
        self._confirmed = etag is not None  # the size and ETag are the object's, not a listing's
        self._lock = threading.Lock()

    def read_into(self, offset: int, out: memoryview) -> int:
        return self.store._read_into(self.key, offset, out, self)

    def confirm(self, meta: Mapping[str, Any]) -> None:
        """ObjectChanged unless an answer's object (`meta`: its size and ETag) is this version."""
        size, tag = int(meta["size"]), meta.get("e_tag")
        with self._lock:
            if not self._confirmed and size == self.size:  # the first answer: the version to read
                self._confirmed, self.version = True, tag
            pinned = self.version
        if size != self.size or tag != pinned:
            had = f"{self.size} bytes" + (f", ETag {pinned}" if pinned else " listed")
            raise ObjectChanged(
                f"{self.url} was replaced while it was read (it had {had}; now {size} bytes, ETag {tag})"
            )
