"""Real S3 servers on 127.0.0.1 for tests and benchmarks: moto, s3rver (npm), and a fault-injecting proxy.

Every server listens on a free loopback port; `stop()` and `start()` keep the port, so a client
configured with the endpoint sees an outage and a recovery. A missing server raises (a test that
needs it fails, it is not skipped): install s3rver with `scripts/install_s3rver.sh`.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
S3RVER_BIN = REPO / ".ci" / "node_modules" / ".bin" / "s3rver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is listening
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start at {url}") from None
            time.sleep(0.1)


class S3Server:
    """One S3 server process on a fixed loopback port; `env` is what activault's S3Store needs."""

    name = ""
    access_key = ""
    secret_key = ""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        return self.url + "/"

    def start(self, timeout: float = 30.0) -> Self:
        # setpriv --pdeathsig: the server gets SIGTERM when this process dies, even by SIGKILL, so a
        # killed test or benchmark leaves no server behind (util-linux; without it, stop() only).
        # The signal follows the thread that started it, so only the main thread (which lives as
        # long as the process) asks for it: a restart from a timer thread must outlive that thread.
        main = threading.current_thread() is threading.main_thread()
        guard = ["setpriv", "--pdeathsig", "TERM", "--"] if main and shutil.which("setpriv") else []
        self.proc = subprocess.Popen(
            [*guard, *self.command()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True
        )
        try:
            _wait_http(self.ready_url(), self.proc, timeout, self.name)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def env(self, url: str | None = None) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "S3_ENDPOINT_URL": url or self.url,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 2}, s3={"addressing_style": "path"}),
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of `bucket`: key -> bytes."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def multipart_uploads(self, bucket: str) -> list[dict[str, Any]]:
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


class MotoServer(S3Server):
    """`moto_server` (in memory: a restart loses every object)."""

    name = "moto"
    access_key = "AKIAMOTOTESTKEY"
    secret_key = "moto-secret-7f3b9c2e-never-logged"

    def command(self) -> list[str]:
        # The module, not the `moto_server` script: the script may be off PATH (pyenv shims, venvs).
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return self.url + "/moto-api/"


class S3rverServer(S3Server):
    """s3rver from npm, objects in a folder (kept across restarts), credentials S3RVER/S3RVER."""

    name = "s3rver"
    access_key = "S3RVER"
    secret_key = "S3RVER"

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        exe = str(S3RVER_BIN) if S3RVER_BIN.exists() else shutil.which("s3rver")
        if exe is None:
            raise RuntimeError("s3rver is not installed: run scripts/install_s3rver.sh (npm install into .ci/)")
        return [exe, "--directory", str(self.directory), "--address", "127.0.0.1", "--port", str(self.port), "--silent"]


def start_server(kind: str, directory: Path) -> S3Server:
    """A started server of `kind` ("moto" or "s3rver")."""
    server: S3Server = MotoServer() if kind == "moto" else S3rverServer(directory)
    return server.start()


# -- fault-injecting proxy -----------------------------------------------------------------------

FAULTS = ("503", "reset", "stall")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class _Proxy:
    """An HTTP server on a free loopback port, run on a daemon thread between `with` and its end."""

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request's body, sent with Content-Length or chunked."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            n = int(handler.rfile.readline().split(b";")[0], 16)
            data = handler.rfile.read(n + 2)[:n]
            if n == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(data)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


class FaultProxy(_Proxy):
    """An HTTP proxy on 127.0.0.1 in front of an S3 server that breaks a seeded fraction of requests.

    Each request, after its body is read, is (with probability `rate`, kinds in turn): forward it;
    answer 503 SlowDown; reset the connection (RST, no answer); stall `stall_s` seconds (past the
    client's timeout) and close; or ("cut", not among the defaults) forward it and reset the
    connection halfway through the answer's body, after its headers promised all of it.
    `down = True` resets every connection (an outage). `counts` tallies what happened. Only requests
    for which `when(method, path)` holds draw faults; `on_request(method, path)` sees every request.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        stall_s: float = 3.0,
        skip: int = 0,
        when: Callable[[str, str], bool] | None = None,
        on_request: Callable[[str, str], None] | None = None,
    ):
        self.upstream = upstream.removeprefix("http://")
        self.rate, self.faults, self.stall_s = rate, faults, stall_s
        self.skip = skip  # requests forwarded untouched before faults start (e.g. the bucket check)
        self.when, self.on_request = when, on_request
        self.down = False
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in separate writes: with Nagle's algorithm the body waited for
            # the client's delayed ACK of the headers (40 ms on a kept-alive connection here), which
            # no real endpoint adds.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                body = _request_body(self)
                if proxy.on_request is not None:
                    proxy.on_request(self.command, self.path)
                fault = proxy._draw(self.command, self.path)
                if fault == "reset" or proxy.down:
                    _reset(self.connection)
                    self.close_connection = True
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                if fault == "503":
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                self._forward(body, cut=fault == "cut")

            def _forward(self, body: bytes, cut: bool = False) -> None:
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"
                    }
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:
                    _reset(self.connection)  # upstream down: the client sees a reset
                    self.close_connection = True
                    return
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.counts["forwarded"] += 1
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                elif resp.getheader("Content-Length"):
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                self.end_headers()
                if cut and len(data) > 1:  # half the body, then a reset: a connection lost mid-answer
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    _reset(self.connection)
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._serve(Handler)

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self.when is not None and not self.when(method, path):
                return None
            if self.counts["requests"] <= self.skip or self._rng.random() >= self.rate:
                return None
            # Which requests fail is seeded; their kinds take turns, so every kind happens.
            fault = self.faults[self.counts["faults"] % len(self.faults)]
            self.counts["faults"] += 1
            self.counts[fault] += 1
            return fault


class ThrottleProxy(_Proxy):
    """An HTTP proxy on 127.0.0.1 in front of an S3 server that paces answers like a real endpoint.

    Each response starts after `latency_s` (first-byte latency) and its body streams at most
    `rate` bytes/s, per request and so per connection (AWS serves ~90 MB/s per connection).
    moto reads a whole object for every ranged GET, so a ranged read costs it the object's size:
    the proxy fetches each object whole once (objects are immutable here) and serves ranges of it
    itself, so that, as on a real endpoint, a range costs its own bytes.
    """

    def __init__(self, upstream: str, *, rate: float = 90e6, latency_s: float = 0.03, chunk: int = 256 << 10):
        self.upstream = upstream.removeprefix("http://")
        self.rate, self.latency_s, self.chunk = rate, latency_s, chunk
        self._objects: dict[str, tuple[int, str, list[tuple[str, str]], bytes]] = {}
        self._fetching: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in separate writes: with Nagle's algorithm the body waited for
            # the client's delayed ACK of the headers (40 ms on a kept-alive connection here), which
            # no real endpoint adds.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: Any) -> None:
                time.sleep(proxy.latency_s)
                self.send_response_only(status, reason)
                for k, v in headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    return
                start, sent = time.monotonic(), 0
                while chunk := data(proxy.chunk):
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    ahead = start + sent / proxy.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)

            def _ranged(self, first: int, last: int | None) -> None:
                status, reason, headers, body = proxy._object(self.path, self.headers)
                if status != 200:  # e.g. 404: passed on as it came
                    self._send(status, reason, headers, io.BytesIO(body).read)
                    return
                last = len(body) - 1 if last is None else min(last, len(body) - 1)
                if first > last:
                    self._send(416, "Range Not Satisfiable", [("Content-Length", "0")], lambda n: b"")
                    return
                view = memoryview(body)[first : last + 1]
                keep = [(k, v) for k, v in headers if k.lower() not in ("content-length", "content-range")]
                keep += [("Content-Length", str(view.nbytes)), ("Content-Range", f"bytes {first}-{last}/{len(body)}")]
                pos = 0

                def data(n: int) -> bytes:
                    nonlocal pos
                    pos += n
                    return bytes(view[pos - n : pos])

                self._send(206, "Partial Content", keep, data)

            def _handle(self) -> None:
                body = _request_body(self)
                wanted = self.headers.get("Range", "")
                try:
                    if self.command == "GET" and "?" not in self.path and wanted.startswith("bytes="):
                        first, _, last = wanted.removeprefix("bytes=").partition("-")
                        if first:
                            self._ranged(int(first), int(last) if last else None)
                            return
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
                    try:
                        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                        conn.request(self.command, self.path, body=body, headers=headers)
                        resp = conn.getresponse()
                        self._send(resp.status, resp.reason, resp.getheaders(), resp.read)
                    finally:
                        conn.close()
                except OSError:
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._serve(Handler)

    def _object(self, path: str, request: Any) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Upstream's answer to a GET of the whole object at `path` (unpaced; kept once it is a 200)."""
        with self._lock:
            lock = self._fetching.setdefault(path, threading.Lock())
        with lock:
            if path not in self._objects:
                conn = http.client.HTTPConnection(self.upstream, timeout=120)
                try:
                    skip = _HOP | {"range", "content-length"}
                    conn.request("GET", path, headers={k: v for k, v in request.items() if k.lower() not in skip})
                    resp = conn.getresponse()
                    answer = (resp.status, resp.reason, resp.getheaders(), resp.read())
                finally:
                    conn.close()
                if answer[0] != 200:
                    return answer
                self._objects[path] = answer
            return self._objects[path]


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the client sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def environ_without_s3() -> dict[str, str]:
    """os.environ minus every S3/AWS setting (so a test's env is the only one in effect)."""
    return {k: v for k, v in os.environ.items() if not (k.startswith("AWS_") or k.startswith("S3_"))}
