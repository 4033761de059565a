"""The digit page's backend: serves serving/web/ and forwards each image to TorchServe.

The page (plain HTML, JS and CSS, nothing to build) talks only to this small standard-library
server. It adds the inference token, so no token ever reaches the browser, and it returns the 28×28
digit the model saw, made by training/core/inputs/preprocess.py (the handler's own function): the page has no
copy of the preprocessing. `serving/ui.py` starts and stops it (`make ui`, `make stop`).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.feedback.recent import RecentAnswers, correction_from_page
from serving.feedback.service import MAX_PAGE_BODY, FeedbackService
from serving.http_json import CLIENT_TIMEOUT_S, MAX_CLIENTS, BoundedServer, JsonHandler
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
# Where /explanations is missing while /predictions answers, ask /predictions alone, and try
# /explanations again this much later: a version promoted since may have them.
EXPLAIN_RECHECK_S = 300.0


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
        self.recent = RecentAnswers()  # what the model saw and said, for a correction of it (serving/feedback/)

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
            version = str(answer.pop("_version", ""))
            # The same function the handler ran, on the same bytes: the digit the model saw. Where a server
            # newer than this checkout accepts more than it does, the page shows the answer alone.
            seen = None
            with contextlib.suppress(PreprocessError):
                seen = preprocess_bytes(image)
            answer = self._with_pictures(answer, seen)
            if seen is not None:  # an id the page's correction names: the backend keeps what a row needs
                answer["id"] = self.recent.remember(seen, image, self.torchserve.model_name, version, answer)
            return 200, answer
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
        headers: dict[str, str] = {}
        status, raw = self.torchserve.request("inference", f"/{api}/{self.torchserve.model_name}", image,
                                              headers={"Content-Type": "application/octet-stream"},
                                              response_headers=headers)
        answer = _json(raw)
        if status == 200:  # the handler names the version that answered (a correction records it)
            answer["_version"] = next((v for k, v in headers.items() if k.lower() == "x-model-version"), "")
        return status, answer

    @staticmethod
    def _with_pictures(answer: dict[str, Any], seen: np.ndarray | None) -> dict[str, Any]:
        answer = dict(answer)
        found = find_attribution_map(answer)
        if found is not None:
            key, attributions = found
            del answer[key]  # the page needs the picture, not 784 numbers
            answer["heatmap"] = heatmap_png(attributions)
        if seen is not None:
            answer["input"] = png_data_url(seen)
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


class PageHandler(JsonHandler):
    server: PageServer
    server_version = "mnist-ui"

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
        path = self.path.split("?", 1)[0]
        if path == "/api/predict":
            if self._cross_site(json_body=False) or (body := self._read_body(MAX_BODY)) is None:
                return
            self._send_json(*self.server.backend.predict(body))
        elif path == "/api/feedback":
            if self._cross_site(json_body=True) or (body := self._read_body(MAX_PAGE_BODY)) is None:
                return
            self._send_json(*self._feedback(body))
        else:
            self._refuse(404, f"no API at {self.path}")

    def _feedback(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """A correction of an answer this backend gave (by its id): stored with the 28×28 the model saw."""
        if self.server.feedback is None:
            return 404, {"error": "this page stores no feedback", "kind": "client"}
        request = _json(body)
        return self.server.feedback.submit("page", lambda: correction_from_page(request, self.server.backend.recent))

    def _cross_site(self, json_body: bool) -> bool:
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
        if json_body and content_type != "application/json":
            self._refuse(415, "send the correction as application/json")
            return True
        if not json_body and content_type != "application/octet-stream" and not content_type.startswith("image/"):
            self._refuse(415, "send the image as application/octet-stream or image/*")
            return True
        return False


class PageServer(BoundedServer):
    name = "page's server"

    def __init__(self, torchserve: TorchServe, host: str = "127.0.0.1", port: int = 0, quiet: bool = False,
                 client_timeout: float = CLIENT_TIMEOUT_S, max_clients: int = MAX_CLIENTS,
                 feedback: FeedbackService | None = None):
        super().__init__((host, port), PageHandler, quiet, client_timeout, max_clients)
        self.backend = Backend(torchserve)
        self.feedback = feedback
