"""A throttling HTTP proxy on 127.0.0.1 in front of an S3 server: S3 as a reader meets it on a network.

Each connection's answers stream at most `cap` bytes/s (AWS serves ~90 MB/s per connection), and
each answer's first byte leaves `first_byte_s` after the upstream server answered (AWS: ~30 ms).
Requests go through as they came, Range header included, and answers stream through as upstream
sends them: nothing is cached or fetched whole. So upstream's own cost passes through unchanged,
neither hidden nor added to: moto reads the whole object for every ranged GET, and that time shows
in `counts["upstream_s"]` (time from the request to upstream's headers), which the benchmark
reports next to its figures.

    with ThrottledProxy(server.url, cap=90e6, first_byte_s=0.03) as proxy:
        store = open_store("s3://bucket", env=server.env(proxy.url))
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, Self

# Hop-by-hop headers (RFC 9110 7.6.1): between one client and one server, never forwarded.
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
# 256 KiB per write: ~3 ms at 90 MB/s, the pacing's grain.
CHUNK = 256 << 10


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class ThrottledProxy:
    """The proxy, serving on a thread between `with` (or `start()`) and its end (or `close()`).

    Args:
        cap: bytes/s per connection, over each answer's body (a connection carries one answer at a time).
        first_byte_s: added before each answer, after upstream's headers arrived.
        clock: where pacing reads the time and sleeps (the `time` module; tests pass a virtual one).
    """

    def __init__(
        self,
        upstream: str,
        *,
        cap: float = 90e6,
        first_byte_s: float = 0.03,
        chunk: int = CHUNK,
        clock: Clock = time,  # type: ignore[assignment]
    ):
        if cap <= 0 or first_byte_s < 0:
            raise ValueError(f"cap must be > 0 and first_byte_s >= 0, not {cap} and {first_byte_s}")
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.cap, self.first_byte_s, self.chunk, self.clock = cap, first_byte_s, chunk, clock
        self.counts: Counter[str] = Counter()  # requests, ranged, body_bytes, connections
        self.upstream_s = 0.0  # summed over requests: from forwarding a request to upstream's headers
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="throttled-proxy", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, cut open connections and wait for every handler thread to end."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # a kept-alive connection's reader wakes up and ends
                except OSError:
                    pass
        self._server.server_close()  # joins the handler threads (block_on_close)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> dict[str, float]:
        """The counters now: compare two snapshots to see one reader's traffic."""
        with self._lock:
            return {**self.counts, "upstream_s": self.upstream_s}

    def _count(self, upstream_s: float = 0.0, **add: int) -> None:
        with self._lock:
            self.counts.update(add)
            self.upstream_s += upstream_s

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # joined at server_close: nothing outlives close()
    block_on_close = True


def _handler(proxy: ThrottledProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes: with Nagle's algorithm the body waited for the
        # client's delayed ACK of the headers (40 ms on a kept-alive connection here), which no real
        # endpoint adds.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            proxy._track(self.connection, True)
            proxy._count(connections=1)

        def finish(self) -> None:
            proxy._track(self.connection, False)
            try:
                super().finish()
            except OSError:
                pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            t0 = time.monotonic()
            conn = http.client.HTTPConnection(proxy.upstream, timeout=300)
            try:
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                except OSError:
                    self._answer(502, "Bad Gateway", [("Content-Length", "0")], None)
                    return
                ranged = int(self.command == "GET" and "Range" in self.headers)
                proxy._count(time.monotonic() - t0, requests=1, ranged=ranged)
                self._answer(resp.status, resp.reason, resp.getheaders(), resp)
            except OSError:
                self.close_connection = True  # the client went away mid-answer
            finally:
                conn.close()

        def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], resp: Any) -> None:
            clock = proxy.clock
            clock.sleep(proxy.first_byte_s)
            body = resp is not None and self.command != "HEAD"
            length = dict((k.lower(), v) for k, v in headers).get("content-length")
            pending = b""
            if body and length is None:  # upstream sent it chunked: passed on with its length
                pending = resp.read()
                length = str(len(pending))
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if not body:
                return
            start, sent = clock.monotonic(), 0
            while data := pending or resp.read(proxy.chunk):
                pending = b""
                for at in range(0, len(data), proxy.chunk):
                    part = data[at : at + proxy.chunk]
                    sent += len(part)
                    # Held until the cap allows it, then sent: no burst, and no pause after the last byte.
                    ahead = start + sent / proxy.cap - clock.monotonic()
                    if ahead > 0:
                        clock.sleep(ahead)
                    proxy._count(body_bytes=len(part))  # before the write: counted once the client has it
                    self.wfile.write(part)
            self.wfile.flush()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
