"""The HTTP server of /metrics, /healthz and the landing page: what a scrape gets and how a client is treated.

The body of /metrics is the text `exposition.Exposition` rendered once per sample; here it is only copied.
"""

from __future__ import annotations

import html
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import __version__
from .exposition import Exposition
from .sample import Sample
from .webconfig import WebConfig

log = logging.getLogger("mem_exporter.exposition")  # the name its lines have always carried in the daemon's log


LANDING = """<!doctype html><html><head><title>mem-exporter</title></head><body>
<h1>mem-exporter {version}</h1>
<p>Per-process-group memory, system RAM and GPU gauges for Prometheus.</p>
<ul><li><a href="/metrics">/metrics</a> - the latest sample</li>
<li><a href="/healthz">/healthz</a> - 200 while samples are fresh</li></ul>
<p>{status}</p></body></html>
"""


MAX_HEADER_BYTES = 16 * 1024  # request line and headers together; a scraper sends a few hundred bytes
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 23\r\n"
    b"Connection: close\r\n\r\nrequest head too large\n"
)


class _HeadTooLarge(Exception):
    pass


class _HeadBudget:
    """The connection's reader while a request head is read: lines come from the real reader, but no more
    than MAX_HEADER_BYTES in all, so a client's headers (read before authentication) pin at most that."""

    def __init__(self, rfile, budget: int):
        self._rfile = rfile
        self._left = budget

    def readline(self, size: int = -1) -> bytes:
        cap = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        line = self._rfile.readline(cap)
        self._left -= len(line)
        if self._left < 0:
            raise _HeadTooLarge()
        return line

    def __getattr__(self, name: str):
        return getattr(self._rfile, name)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms per keep-alive scrape

    def setup(self) -> None:
        # a slow or idle client is dropped, never waited on for ever (what a `timeout` class attribute would do,
        # per server instead of per class)
        self.request.settimeout(self.server.client_timeout)
        self.web = self.server.web  # one web config for the whole connection, even across a reload
        super().setup()

    def handle_one_request(self) -> None:
        # the budget stands in for the stream, which the parser reads only through readline
        real, self.rfile = self.rfile, _HeadBudget(self.rfile, MAX_HEADER_BYTES)  # type: ignore[assignment]
        try:
            super().handle_one_request()
        except _HeadTooLarge:
            self.close_connection = True
            try:
                self.wfile.write(_TOO_LARGE)
                self.wfile.flush()
            except OSError:
                pass
        finally:
            self.rfile = real

    def do_GET(self) -> None:
        if not self.web.authorized(self.headers.get("Authorization")):
            self._send(
                401, "text/plain; charset=utf-8", b"Unauthorized\n", {"WWW-Authenticate": 'Basic realm="mem-exporter"'}
            )
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.exposition.render(self.headers.get("Accept", ""))
            self._send(200, content_type, body)
        elif path in ("/healthz", "/-/healthy"):
            ok, text = self.server.health()
            self._send(200 if ok else 503, "text/plain; charset=utf-8", (text + "\n").encode())
        elif path == "/":
            _, text = self.server.health()
            page = LANDING.format(version=__version__, status=html.escape(text))
            self._send(200, "text/html; charset=utf-8", page.encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics\n")

    def _send(self, code: int, content_type: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self.web.headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # keep access logs out of the daemon's log
        log.debug("%s %s", self.address_string(), fmt % args)


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n\r\ntoo many clients\n"
)
_NOT_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)


class MetricsServer(ThreadingHTTPServer):
    """One thread per connection, apart from sampling and enforcement: a flood or a slow client costs
    those nothing. Open connections are capped (`max_connections`; the rest get 503 at once) and
    each is dropped after `client_timeout` seconds of silence. TLS and basic auth come from `web`,
    which a reload may replace; the TLS handshake runs in the connection's thread, not the accept loop."""

    daemon_threads = True  # stopping never waits for a client, however slow
    # A restart may bind at once over the old socket's TIME_WAIT. Not on Windows: there SO_REUSEADDR lets a
    # second process bind a port that is in use (a second exporter, or another user's program, would take
    # scrapes silently); the port is claimed exclusively instead (server_bind).
    allow_reuse_address = os.name != "nt"
    request_queue_size = 128  # listen backlog: 50 scrapers connecting at once must not wait for SYN retries

    def server_bind(self) -> None:
        exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)  # Windows only
        if exclusive is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, exclusive, 1)
        super().server_bind()

    def __init__(
        self,
        listen: str,
        exposition: Exposition,
        health: Callable[[], tuple[bool, str]],
        web: WebConfig | None = None,
        max_connections: int = 100,
        client_timeout: float = 10.0,
    ):
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), _Handler)
        self.exposition = exposition
        self.health = health
        self.web = web or WebConfig()
        self.client_timeout = client_timeout
        self.max_connections = max_connections
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._last_refusal_log = 0.0
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]  # what server_address holds, typed as text here
        return f"{'https' if self.web.tls else 'http'}://{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    # --- connections (the accept loop runs process_request; a thread per connection the rest) ---
    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:
        ctx = self.web.ssl_context
        if ctx is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.client_timeout)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first != b"\x16":  # not a TLS handshake record: say so, as Go's servers do
                request.sendall(_NOT_TLS)
                return
            conn = ctx.wrap_socket(request, server_side=True)  # the handshake, under the timeout
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address[0], e)
            return
        try:
            super().finish_request(conn, client_address)  # the handler, on the TLS connection
        finally:
            conn.close()

    def _refuse(self, request) -> None:
        """Beyond max_connections: a 503 without blocking the accept loop (TLS clients just see a close)."""
        self.refused += 1
        if not self.web.tls:
            try:
                request.setblocking(False)  # never wait on this client (MSG_DONTWAIT, but on every OS)
                request.send(_BUSY)
            except OSError:
                pass
        self.shutdown_request(request)
        now = time.monotonic()
        if now - self._last_refusal_log > 60:
            self._last_refusal_log = now
            log.warning(
                "HTTP: %d open connections, the most allowed (web.max_connections); refusing more (%d refused so far)",
                self.max_connections,
                self.refused,
            )

    def handle_error(self, request, client_address) -> None:  # a client gone mid-response is no error of ours
        log.debug("HTTP connection from %s failed", client_address[0], exc_info=True)


def sample_health(
    get_sample: Callable[[], Sample | None], interval: Callable[[], float]
) -> Callable[[], tuple[bool, str]]:
    def health() -> tuple[bool, str]:
        s = get_sample()
        if s is None:
            return False, "no sample yet"
        age = time.time() - s.timestamp
        fresh = age <= max(3 * interval(), 10.0)
        state = "ok" if fresh else "stale"
        return fresh, f"{state}: last sample {age:.1f}s ago, {s.process_count} processes, {len(s.groups)} groups"

    return health
