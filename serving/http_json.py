"""What the page's server (serving/page.py) and the feedback API (serving/feedback/api.py) share: a
bounded thread pool, strict Content-Length, per-read timeouts, the Host check and JSON answers.

Standard library only: each is a small loopback server with a few routes, not a web framework's job.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A slow or stalled client holds a thread: each socket read or write waits at most CLIENT_TIMEOUT_S,
# and at most MAX_CLIENTS connections are served at once (a browser opens 6 per host; more get a 503).
CLIENT_TIMEOUT_S = 30.0
MAX_CLIENTS = 32
# Everything the page loads comes from this server; images are data: and blob: URLs it makes itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class JsonHandler(BaseHTTPRequestHandler):
    server: BoundedServer
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.client_timeout  # type: ignore[misc]  # StreamRequestHandler sets it on the socket
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.quiet:
            return
        super().log_message(format, *args)

    def _read_body(self, max_body: int) -> bytes | None:
        """The body, after a strict Content-Length check; None where an error was answered instead."""
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths or "Transfer-Encoding" in self.headers:  # chunked: its end is not known in advance
            self._refuse(411, "a Content-Length header is required (chunked bodies are not read)")
            return None
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]+", text := lengths[0].strip()):
            # int() would take "-1" (read to the end of the stream), "+5" or " 5": digits only, and one length
            self._refuse(400, f"Content-Length must be one non-negative integer, got {', '.join(lengths)[:40]!r}")
            return None
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(max_body)) or (length := int(digits)) > max_body:  # int() refuses 4,300 digits
            self._refuse(413, f"the body is over the {max_body:,}-byte limit (Content-Length {text[:20]})", "input")
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._refuse(408, f"the body did not arrive: nothing for {self.server.client_timeout:g} s")
            return None
        if len(body) < length:  # the client closed the connection: nobody reads an answer
            self.close_connection = True
            return None
        return body

    def _refuse(self, status: int, message: str, kind: str = "client") -> None:
        self.close_connection = True  # an unread body must not be parsed as the next request
        self._send_json(status, {"error": message, "kind": kind})

    def _host_allowed(self) -> bool:
        """Refuse other Host names on a loopback bind: a web page elsewhere could otherwise reach this
        server through DNS rebinding and use the model with the token this backend adds."""
        if self.server.allowed_hosts is None or self.headers.get("Host", "") in self.server.allowed_hosts:
            return True
        self._refuse(403, "unexpected Host header")
        return False

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_clients` at once: the next one is answered 503 at once.
    On a loopback bind only loopback Host names are served (`allowed_hosts`)."""

    daemon_threads = True
    name = "server"

    def __init__(self, address: tuple[str, int], handler: type[JsonHandler], quiet: bool = False,
                 client_timeout: float = CLIENT_TIMEOUT_S, max_clients: int = MAX_CLIENTS) -> None:
        super().__init__(address, handler)
        self.quiet = quiet
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self._clients = 0
        self._clients_lock = threading.Lock()
        host, port = address[0], self.server_address[1]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name
            loopback = host == "localhost"
        self.allowed_hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")} if loopback else None

    def busy_clients(self) -> int:
        """Connections being served now."""
        return self._clients

    def _count_client(self, step: int) -> bool:
        with self._clients_lock:
            if step > 0 and self._clients >= self.max_clients:
                return False
            self._clients += step
            return True

    def process_request(self, request: Any, client_address: Any) -> None:  # a TCP server: a socket
        if not self._count_client(+1):
            self._answer_busy(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._count_client(-1)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._count_client(-1)

    def _answer_busy(self, request: socket.socket) -> None:
        """503 without a thread and without waiting: in this accept loop, nothing may block."""
        body = json.dumps({"error": f"the {self.name} is busy: try again in a moment", "kind": "busy"}).encode()
        head = [f"HTTP/1.0 503 {HTTPStatus(503).phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Retry-After: 1", "Connection: close",
                *(f"{k}: {v}" for k, v in SECURITY_HEADERS.items())]
        try:
            request.setblocking(False)
            # Read what the client has sent so far: closing a socket with unread bytes resets the
            # connection, and the client could lose this answer (one still sending a large body may).
            with contextlib.suppress(BlockingIOError):
                request.recv(65536)
            request.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass  # the client is gone, or its window is full: it gets the closed connection
        self.shutdown_request(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}/"

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=self.name, daemon=True)
        thread.start()
        return thread
