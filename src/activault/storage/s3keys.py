# Kept for one user case: a bucket where another tool wrote such a key beside a run (`aws s3 cp x
# s3://b/run/h//x`, a prefix joined with a trailing slash). One such key fails object_store's whole
# listing of the folder (InvalidPathError: "contained empty path segment"), so without this module
# no reader, `ls` or `verify` could list that run at all, and `rm` in `activault shell` could not
# delete the key. With it, they name it as a foreign object and skip or delete it
# (tests/storage/test_s3.py::test_foreign_keys_and_empty_megabatches_are_named_and_deletable,
# tests/tools/test_shell.py::test_s3_shell_names_foreign_keys_and_rm_deletes_them,
# tests/storage/test_s3keys.py: readers skip them).
"""Listing and deleting S3 keys that object_store cannot name (an empty, `.` or `..` segment).

object_store refuses such keys, and one of them in a listing fails the whole listing. activault never
writes one, but a bucket may hold them; these two requests (ListObjectsV2 and DeleteObjects, both
with the keys in the query or body, never in the URL path, where `..` could be normalized away) let
the tools list them as foreign objects and delete them. Requests are signed with AWS Signature V4.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

TIMEOUT_S = 30.0


def bad_key(key: str) -> bool:
    """Whether object_store refuses `key`: an empty, `.` or `..` segment."""
    return any(p in ("", ".", "..") for p in key.split("/"))


class RawS3Error(Exception):
    """A failed raw request; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RawS3:
    endpoint: str  # "" for AWS
    region: str
    bucket: str
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)  # never printed
    session_token: str | None = field(default=None, repr=False)

    def _base(self) -> tuple[str, str]:
        """(scheme://host[:port], path of the bucket)."""
        if self.endpoint:  # path style, as object_store uses for a custom endpoint
            return self.endpoint.rstrip("/"), "/" + urllib.parse.quote(self.bucket)
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com", ""

    def list_keys(self, prefix: str, delimiter: bool) -> tuple[list[str], list[tuple[str, int]]]:
        """(common prefixes, [(key, size)]) of every key under `prefix`, all pages."""
        prefixes: list[str] = []
        objects: list[tuple[str, int]] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if delimiter:
                query["delimiter"] = "/"
            if token:
                query["continuation-token"] = token
            root = ET.fromstring(self._request("GET", query))
            for el in root:
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "Contents":
                    objects.append((_text(el, "Key"), int(_text(el, "Size") or 0)))
                elif tag == "CommonPrefixes":
                    prefixes.append(_text(el, "Prefix"))
            if _text(root, "IsTruncated") != "true":
                return prefixes, objects
            token = _text(root, "NextContinuationToken")

    def delete_keys(self, keys: list[str]) -> None:
        """Delete keys (1000 per request, the S3 limit); an error names the first key that failed."""
        for i in range(0, len(keys), 1000):
            objs = "".join(f"<Object><Key>{escape(k)}</Key></Object>" for k in keys[i : i + 1000])
            body = f'<?xml version="1.0" encoding="UTF-8"?><Delete><Quiet>true</Quiet>{objs}</Delete>'.encode()
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - required by S3
            root = ET.fromstring(
                self._request("POST", {"delete": ""}, body, {"content-md5": md5, "content-type": "application/xml"})
            )
            for el in root:
                if el.tag.rsplit("}", 1)[-1] == "Error":
                    raise RawS3Error(f"cannot delete {_text(el, 'Key')!r}: {_text(el, 'Code')} {_text(el, 'Message')}")

    def _request(
        self, method: str, query: dict[str, str], body: bytes = b"", headers: dict[str, str] | None = None
    ) -> bytes:
        base, path = self._base()
        qs = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
        url = f"{base}{path or '/'}?{qs}"
        hdrs = {**(headers or {}), **self._sign(method, base, path or "/", qs, body, headers or {})}
        req = urllib.request.Request(url, data=body or None, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310 - http(s) only
                return bytes(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise RawS3Error(f"status code: {e.code} {e.reason}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise RawS3Error(f"error sending request: {getattr(e, 'reason', e)}") from None

    def _sign(self, method: str, base: str, path: str, qs: str, body: bytes, extra: dict[str, str]) -> dict[str, str]:
        """Signature V4 headers (none for an unsigned, public bucket)."""
        if not (self.access_key_id and self.secret_access_key):
            return {}
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {
            **{k.lower(): v for k, v in extra.items()},
            "host": urllib.parse.urlsplit(base).netloc,
            "x-amz-date": stamp,
            "x-amz-content-sha256": hashlib.sha256(body).hexdigest(),
        }
        if self.session_token:
            headers["x-amz-security-token"] = self.session_token
        names = sorted(headers)
        canonical = "\n".join(
            [
                method,
                path,
                qs,
                *(f"{n}:{headers[n].strip()}" for n in names),
                "",
                ";".join(names),
                headers["x-amz-content-sha256"],
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        key = ("AWS4" + self.secret_access_key).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key_id}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        del headers["host"]  # urllib sends it
        return headers


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def _text(el: ET.Element, tag: str) -> str:
    for child in el:
        if child.tag.rsplit("}", 1)[-1] == tag:
            return child.text or ""
    return ""
