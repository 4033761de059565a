"""Two registered versions on the same MNIST test digits, over HTTP: `make compare A=1.0 B=2.0`.

Each digit goes as a PNG to `/predictions/mnist/<A>` and `/predictions/mnist/<B>` of the running
server, the way a client would send it; an answer whose X-Model-Version header names another version
counts as an error. Prints each version's accuracy, how often they agree, and the digits where they
disagree: what to read before `make promote`.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import cv2

from serving.client import ServerClient
from serving.errors import ServerError
from training.cli import ArgumentParser
from training.data import load_split


@dataclass
class Comparison:
    versions: tuple[str, str]
    labels: list[int]
    answers: dict[str, list[int]] = field(default_factory=dict)  # -1: no valid answer
    errors: dict[str, Counter] = field(default_factory=dict)  # "HTTP 503", "version 1.0", ...

    def accuracy(self, version: str) -> float:
        return sum(a == y for a, y in zip(self.answers[version], self.labels, strict=True)) / len(self.labels)

    def disagreements(self) -> list[int]:
        a, b = (self.answers[v] for v in self.versions)
        return [i for i in range(len(self.labels)) if a[i] != b[i]]


class _Sender:
    """One keep-alive connection per thread: 20k requests over new connections would measure TCP, not models."""

    def __init__(self, client: ServerClient):
        url = urlsplit(client.url("inference"))
        self.host, self.port, self.client = url.hostname or "127.0.0.1", url.port, client
        self.headers = {"Content-Type": "image/png"}
        if key := client.token("inference"):
            self.headers["Authorization"] = f"Bearer {key}"
        self.local = threading.local()

    def send(self, version: str, png: bytes) -> tuple[int | str, str, bytes]:
        conn = getattr(self.local, "conn", None) or http.client.HTTPConnection(self.host, self.port, timeout=30)
        self.local.conn = conn
        try:
            conn.request("POST", f"/predictions/{self.client.model_name}/{version}", png, self.headers)
            response = conn.getresponse()
            return response.status, response.getheader("X-Model-Version", ""), response.read()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            self.local.conn = None
            return type(err).__name__, "", b""


def compare(client: ServerClient, a: str, b: str, limit: int | None = None, data_dir: str | None = None,
            concurrency: int = 8) -> Comparison:
    images, labels = load_split(data_dir, train=False)
    n = len(labels) if limit is None else min(limit, len(labels))
    pngs = [cv2.imencode(".png", images[i].numpy())[1].tobytes() for i in range(n)]
    result = Comparison((a, b), [int(y) for y in labels[:n]])
    sender = _Sender(client)
    for version in (a, b):
        errors: Counter = Counter()

        def one(png: bytes, version: str = version, errors: Counter = errors) -> int:
            status, answered_by, body = sender.send(version, png)
            if status != 200:
                errors[f"HTTP {status}"] += 1
                return -1
            if answered_by != version:  # the path named one version and another answered: never acceptable
                errors[f"answered by version {answered_by or '?'}"] += 1
                return -1
            return int(json.loads(body)["digit"])

        with ThreadPoolExecutor(concurrency) as pool:
            result.answers[version] = list(pool.map(one, pngs))
        result.errors[version] = errors
    return result


def report(result: Comparison, model_name: str) -> list[str]:
    a, b = result.versions
    n = len(result.labels)
    lines = [f"{model_name} {a} vs {b} on {n} MNIST test digits, over HTTP",
             f"{'version':<9} {'accuracy':>9}  errors"]
    for v in result.versions:
        errors = ", ".join(f"{k}: {c}" for k, c in result.errors[v].items()) or "0"
        lines.append(f"{v:<9} {result.accuracy(v):>9.2%}  {errors}")
    diff = result.disagreements()
    lines.append(f"agreement {1 - len(diff) / n:.2%} ({n - len(diff)} of {n})")
    if diff:
        by_label = Counter(result.labels[i] for i in diff)
        lines.append("disagreements by true digit: " + "  ".join(f"{d}: {by_label[d]}" for d in sorted(by_label)))
        right = Counter("both wrong" if result.answers[a][i] != result.labels[i] != result.answers[b][i]
                        else f"{a} right" if result.answers[a][i] == result.labels[i] else f"{b} right" for i in diff)
        lines.append("of the disagreements: " + ", ".join(f"{k} {c}" for k, c in sorted(right.items())))
        lines.append("first ones (test index: true digit, A says, B says): " + "; ".join(
            f"#{i}: {result.labels[i]}, {result.answers[a][i]}, {result.answers[b][i]}" for i in diff[:8]))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.compare", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a registered version, e.g. 1.0")
    parser.add_argument("b", help="another registered version, e.g. 2.0")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test digits")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    client = ServerClient(model_name=args.model_name)
    client.auth = (client.run_dir / "key_file.json").exists()
    try:
        result = compare(client, args.a, args.b, args.limit, args.data_dir, args.concurrency)
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(report(result, args.model_name)))
    return 0 if not any(result.errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
