"""The feedback API for programs: `make feedback-api` (python -m serving.feedback.api), loopback by default.

    POST /feedback   Authorization: Bearer <feedback key>, Content-Type: application/json
                     {"image": base64 of the bytes sent to TorchServe, "model_name", "model_version",
                      "answer", "confidence", "is_digit", "label": 0-9 or "not a digit", "keep_raw"?}
                     → 201 {"id", "stored": true} | 200 {"duplicate": true} | 4xx {"error", "kind"}
    GET  /metrics    Prometheus counters per version, read from the database (configs/prometheus.yml)

Keys: serving/feedback/keys.py (`--add-key NAME` prints a new one). The page stores its corrections
through the same FeedbackService without a key: it answers only its own origin (serving/page.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from typing import Any

from serving.feedback.keys import FeedbackKeyError, add_key, key_name, read_keys
from serving.feedback.service import MAX_API_BODY, FeedbackService, correction_from_api
from serving.http_json import BoundedServer, JsonHandler
from training.feedback.store import DB_HELP, FeedbackStore, FeedbackStoreError

DEFAULT_PORT = 8093


class FeedbackHandler(JsonHandler):
    server: FeedbackServer
    server_version = "mnist-feedback"

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics().encode(), "text/plain; version=0.0.4")
        elif path == "/healthz":
            self._send_json(200, {"ok": True})
        else:
            self._refuse(404, f"no API at {path}")

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        if self.path.split("?", 1)[0] != "/feedback":
            self._refuse(404, f"no API at {self.path}")
            return
        name = key_name(self.headers.get("Authorization"), self.server.keys)
        if name is None:
            self.server.rejected["key"] += 1
            self._refuse(401, "a feedback key is required: Authorization: Bearer <key> (`make feedback-key`); "
                              "the inference token is not one")
            return
        if self.headers.get_content_type() != "application/json":
            self._refuse(415, "send the correction as application/json")
            return
        if (body := self._read_body(MAX_API_BODY)) is None:
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self._refuse(400, "the body must be one JSON object", "input")
            return
        status, answer = self.server.service.submit(name, lambda: correction_from_api(request, name))
        if status >= 400:
            self.server.rejected[answer.get("kind", "input")] += 1
        self._send_json(status, answer)


class FeedbackServer(BoundedServer):
    name = "feedback API"

    def __init__(self, service: FeedbackService, keys: dict[str, str], host: str = "127.0.0.1",
                 port: int = 0, **kwargs: Any) -> None:
        super().__init__((host, port), FeedbackHandler, **kwargs)
        self.service, self.keys = service, keys
        self.rejected: Counter[str] = Counter()  # refusals by kind, since this process started

    def metrics(self) -> str:
        """Counters from the database (so they survive restarts and count the page's rows too), one
        family after the other as the text format requires. The labels are spelled as the handler's
        (TorchServe's dimension names ModelName, ModelVersion), so configs/alerts.yml can divide one by the other."""
        counts = self.service.store.counts()
        families = [("mnist_feedback_received_total", "Feedback rows stored, per model version.", 2),
                    ("mnist_feedback_corrections_total", "Stored feedback whose label differs from the answer.", 3)]
        lines = []
        for name, text, column in families:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            lines += [f'{name}{{ModelName="{_escape(row[0])}",ModelVersion="{_escape(row[1])}"}} {row[column]}'
                      for row in counts]
        lines += ["# HELP mnist_feedback_rejected_total Feedback refused since this API started, by kind.",
                  "# TYPE mnist_feedback_rejected_total counter"]
        lines += [f'mnist_feedback_rejected_total{{kind="{k}"}} {n}' for k, n in sorted(self.rejected.items())]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.feedback.api", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--db", default=None, help=DB_HELP)
    parser.add_argument("--add-key", metavar="NAME", help="create (or replace) the feedback key NAME, print it, exit")
    args = parser.parse_args(argv)
    try:
        if args.add_key:
            print(add_key(args.add_key))
            return 0
        keys = read_keys()
        store = FeedbackStore(args.db)
    except (FeedbackKeyError, FeedbackStoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not keys:
        print("warning: no feedback keys yet: every POST gets 401 (`make feedback-key NAME=...`)", file=sys.stderr)
    server = FeedbackServer(FeedbackService(store), keys, args.host, args.port)
    print(f"feedback API on http://{args.host}:{server.server_address[1]}/feedback → {store.safe_url()}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
