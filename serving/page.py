"""The digit page's backend: serves serving/web/ and forwards each image to TorchServe.

The page (plain HTML, JS and CSS, nothing to build) talks only to this small standard-library
server. It adds the inference token, so no token ever reaches the browser, and it returns the 28×28
digit the model saw, made by training/core/inputs/preprocess.py (the handler's own function): the page has no
copy of the preprocessing. `serving/ui.py` starts and stops it (`make ui`, `make stop`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from serving.page_pictures import find_attribution_map, heatmap_png, png_data_url, strip_data_url
from serving.server import ServerError, TorchServe
from training.core.inputs.preprocess import PreprocessError, preprocess_bytes

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
# TorchServe's max_request_size (configs/config.properties): anything larger would be refused there
# anyway, so refuse it here before reading it. The page shrinks big photos before sending them.
MAX_BODY = 1_048_576
# A slow or stalled client holds a thread: each socket read or write waits at most CLIENT_TIMEOUT_S,
# and at most MAX_CLIENTS connections are served at once (a browser opens 6 per host; more get a 503).
CLIENT_TIMEOUT_S = 30.0
MAX_CLIENTS = 32
# Where /explanations is missing while /predictions answers, ask /predictions alone, and try
# /explanations again this much later: a version promoted since may have them.
EXPLAIN_RECHECK_S = 300.0
# Everything the page loads comes from this server; images are data: and blob: URLs it makes itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Backend:
    """The page's calls to TorchServe. /explanations is asked first; where it answers, its map becomes
    the heatmap. Where it is missing (404/405/501) while /predictions answers, later calls go to
    /predictions alone for `recheck_s`. A 404 from both (the model itself missing, as while a server
    restarts or a version is re-registered) says nothing about explanations: the next image asks again."""

    def __init__(self, torchserve: TorchServe, recheck_s: float = EXPLAIN_RECHECK_S) -> None:
        self.torchserve = torchserve
        self.explanations: bool | None = None  # unknown until the first image
        self.recheck_s = recheck_s
        self._recheck_at = 0.0  # monotonic time from which a missing /explanations is asked again

    def predict(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            image = strip_data_url(body)
        except PreprocessError as err:
            return 400, {"error": str(err), "kind": "input"}
        try:
            status, answer = self._infer(image)
        except ServerError as err:
            return 503, {"error": f"TorchServe is not answering ({err}); start it with `make serve`",
                         "kind": "down"}
        if status == 200 and isinstance(answer.get("digit"), int):
            return 200, self._with_pictures(answer, image)
        return _error_for(status, answer)

    def _infer(self, image: bytes) -> tuple[int, dict[str, Any]]:
        extra: dict[str, Any] = {}
        missing = False
        if self.explanations is not False or time.monotonic() >= self._recheck_at:
            status, explained = self._post("explanations", image)
            if status in (404, 405, 501):  # no explanations, or no model: /predictions tells which
                missing = True
            elif status == 400:  # a bad image or token: /predictions would say the same
                return status, explained
            elif status == 200 and isinstance(explained.get("digit"), int):
                self.explanations = True
                return status, explained
            elif status == 200:  # a map without the prediction: keep the map, ask for the prediction
                extra = explained
            # and a failed explanation (5xx) still gets this image its answer from /predictions
        status, answer = self._post("predictions", image)
        if missing and status == 200:  # the model answers but has no explanations
            self.explanations, self._recheck_at = False, time.monotonic() + self.recheck_s
        return status, {**extra, **answer} if status == 200 else answer

    def _post(self, api: str, image: bytes) -> tuple[int, dict[str, Any]]:
        status, raw = self.torchserve.request("inference", f"/{api}/{self.torchserve.model_name}", image,
                                              headers={"Content-Type": "application/octet-stream"})
        return status, _json(raw)

    @staticmethod
    def _with_pictures(answer: dict[str, Any], image: bytes) -> dict[str, Any]:
        answer = dict(answer)
        found = find_attribution_map(answer)
        if found is not None:
            key, attributions = found
            del answer[key]  # the page needs the picture, not 784 numbers
            answer["heatmap"] = heatmap_png(attributions)
        # The same function the handler ran, on the same bytes: the digit the model saw. Where a server
        # newer than this checkout accepts more than it does, the page shows the answer alone.
        with contextlib.suppress(PreprocessError):
            answer["input"] = png_data_url(preprocess_bytes(image))
        return answer


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"message": raw[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"message": str(value)[:200]}


def _error_for(status: int, answer: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    message = str(answer.get("message", ""))[:300]
    # TorchServe 0.12 answers a refused token with 400 InvalidKeyException, not 401 (docs: Serving, Security defaults).
    if status in (401, 403) or answer.get("type") == "InvalidKeyException":
        return 502, {"error": "TorchServe refused the inference token: the key file does not belong to the "
                              "running server; restart both with `make stop && make ui`", "kind": "auth"}
    if status == 413:
        return 413, {"error": "the image is over TorchServe's 1 MiB request limit", "kind": "input"}
    if status == 400:
        return 400, {"error": message or "TorchServe refused the image", "kind": "input"}
    return 502, {"error": f"TorchServe answered HTTP {status}: {message or 'no message'}", "kind": "server"}


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "mnist-ui"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.client_timeout  # type: ignore[misc]  # StreamRequestHandler sets it on the socket
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.quiet:
            return
        super().log_message(format, *args)

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b'{"ok": true}', "application/json")
        elif path in STATIC:
            name, content_type = STATIC[path]
            self._send(200, (WEB / name).read_bytes(), content_type)
        else:
            self._send_json(404, {"error": f"no page at {path}", "kind": "client"})

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        if self.path.split("?", 1)[0] != "/api/predict":
            self._refuse(404, f"no API at {self.path}")
            return
        if self._cross_site() or (body := self._read_body()) is None:
            return
        status, answer = self.server.backend.predict(body)
        self._send_json(status, answer)

    def _cross_site(self) -> bool:
        """Refuse what another web page open in the same browser could send, before the backend adds the
        token (OWASP's CSRF cheat sheet): the Host check stops DNS rebinding, not a page that posts here
        with `fetch(..., {mode: "no-cors"})` or a form. Browsers send Origin and Sec-Fetch-Site on such
        posts; curl and scripts send neither, and get through on the content type alone."""
        origin, site = self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site")
        if (origin is not None and origin != "http://" + self.headers.get("Host", "")) or \
                (site is not None and site not in ("same-origin", "none")):
            self._refuse(403, f"cross-site request refused (Origin {origin}, Sec-Fetch-Site {site}): the API "
                              "answers the page's own requests only")
            return True
        # Another page can post text/plain, form-urlencoded or multipart without a CORS preflight (which
        # this server never answers), but not these: what the page sends, and what an image is.
        content_type = self.headers.get_content_type()  # text/plain where there is none
        if content_type != "application/octet-stream" and not content_type.startswith("image/"):
            self._refuse(415, "send the image as application/octet-stream or image/*")
            return True
        return False

    def _read_body(self) -> bytes | None:
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
        if len(digits) > len(str(MAX_BODY)) or (length := int(digits)) > MAX_BODY:  # int() refuses 4,300 digits
            self._refuse(413, f"the image is over the {MAX_BODY:,}-byte limit (Content-Length {text[:20]})", "input")
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


class PageServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_clients` at once: the next one is answered 503 at once."""

    daemon_threads = True

    def __init__(self, torchserve: TorchServe, host: str = "127.0.0.1", port: int = 0, quiet: bool = False,
                 client_timeout: float = CLIENT_TIMEOUT_S, max_clients: int = MAX_CLIENTS):
        super().__init__((host, port), PageHandler)
        self.backend = Backend(torchserve)
        self.quiet = quiet
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self._clients = 0
        self._clients_lock = threading.Lock()
        port = self.server_address[1]
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
        body = json.dumps({"error": "the page's server is busy: try again in a moment", "kind": "busy"}).encode()
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
        thread = threading.Thread(target=self.serve_forever, name="mnist-ui", daemon=True)
        thread.start()
        return thread
