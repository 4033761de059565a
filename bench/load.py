"""The load clients the benchmarks and the fault scripts share: wrk for throughput, Python threads
for per-request outcomes, and a sampler that checks answers against the offline model while load runs."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import torch

from serving.server import TorchServe
from training.data import load_split

WRK_SCRIPT = '''
local bodies = {}
local n = 0
for line in io.lines("%(list)s") do
  local f = assert(io.open(line, "rb")); n = n + 1; bodies[n] = f:read("*a"); f:close()
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
%(auth)srequest = function()
  i = (i %% n) + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format("JSON{\\"requests\\": %%d, \\"seconds\\": %%f, \\"non2xx\\": %%d, \\"socket_errors\\": %%d, "
    .. "\\"p50\\": %%f, \\"p90\\": %%f, \\"p99\\": %%f, \\"max\\": %%f}\\n",
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
'''


def write_wrk_script(script: Path, files: list[Path], token: str | None,
                     content_type: str = "application/octet-stream") -> Path:
    """wrk's Lua at `script`: POST `files` in turn (listed one a line beside it, SCRIPT.txt), report as
    run_wrk parses. `token`: sent as a bearer token (TorchServe's inference key); None sends no
    Authorization header."""
    listing = script.with_suffix(".txt")
    listing.write_text("\n".join(str(p) for p in files) + "\n")
    auth = "" if token is None else f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    script.write_text(WRK_SCRIPT % {"list": listing, "content_type": content_type, "auth": auth})
    return script


def prerequisites_missing(checkpoint: Path) -> bool:
    """Print the one-line error and say so where wrk or the checkpoint is missing."""
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (Debian/Ubuntu: sudo apt-get install wrk)", file=sys.stderr)
        return True
    if not checkpoint.is_file():
        print(f"error: no checkpoint at {checkpoint}: run `make train` first", file=sys.stderr)
        return True
    return False


def write_digits(folder: Path, count: int, data_dir: str | None) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """Real MNIST test digits as 28×28 PNG files, with their images and labels."""
    images, labels = load_split(data_dir, train=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}-{int(labels[i])}.png"
        cv2.imwrite(str(path), images[i].numpy())
        paths.append(path)
    return paths, images[:count], labels[:count]


def run_wrk(server: TorchServe, script: Path, connections: int, seconds: int) -> dict:
    return run_wrk_url(server.url("inference", f"/predictions/{server.model_name}"), script, connections, seconds)


def run_wrk_url(url: str, script: Path, connections: int, seconds: int) -> dict:
    """wrk's summary (requests, seconds, non2xx, socket_errors, p50/p90/p99/max ms) and req/s, from the script's
    `done` line."""
    threads = max(1, min(2, connections))
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60)
    line = next((line for line in out.stdout.splitlines() if line.startswith("JSON")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
    result = json.loads(line[4:])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def digit_of(body: bytes) -> int:
    try:
        return json.loads(body)["digit"]
    except (ValueError, KeyError, TypeError):
        return -1


class Sampler(threading.Thread):
    """Sends digits while wrk runs and compares each answer with the offline prediction."""

    def __init__(self, server: TorchServe, pngs: list[bytes], expected: list[int], parse, limit: int = 200):
        super().__init__(daemon=True)
        self.server, self.pngs, self.expected, self.parse, self.limit = server, pngs, expected, parse, limit
        self.checked = self.wrong = self.failed = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        rng = random.Random(0)
        while not self.stop_flag.is_set() and self.checked + self.failed < self.limit:
            i = rng.randrange(len(self.pngs))
            try:
                status, body = self.server.request("inference", f"/predictions/{self.server.model_name}",
                                                   data=self.pngs[i], timeout=15,
                                                   headers={"Content-Type": "application/octet-stream"})
            except Exception:
                self.failed += 1
                continue
            if status != 200:
                self.failed += 1
                continue
            self.checked += 1
            self.wrong += self.parse(body) != self.expected[i]
            time.sleep(0.02)


@dataclass
class Record:
    start: float  # seconds since the load started
    seconds: float
    status: int | str  # HTTP status, or the exception a client saw instead of an answer
    detail: str  # start of the body (or exception message) when not 200
    wrong: bool
    version: str = ""  # the X-Model-Version header: which model version answered
    item: int = -1  # which of the bodies was sent

    @property
    def end(self) -> float:
        return self.start + self.seconds


def p99_ms(records: Iterable[Record]) -> float | None:
    """The 99th-percentile latency of `records` in ms (the nearest rank below); None for no records."""
    latencies = sorted(r.seconds for r in records)
    return 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None


class Load:
    """`threads` keep-alive HTTP clients posting MNIST digits as fast as answers come back.

    Every request's outcome is recorded; a 200 is checked against the offline model's answer.
    """

    def __init__(self, server: TorchServe, pngs: list[bytes], expected: list[int], threads: int,
                 max_seconds: float, timeout: float):
        url = urlsplit(server.url("inference"))
        self.host, self.port = url.hostname or "127.0.0.1", url.port
        self.path = f"/predictions/{server.model_name}"
        self.headers = {"Content-Type": "application/octet-stream",
                        "Authorization": f"Bearer {server.token('inference')}"}
        self.pngs, self.expected = pngs, expected
        self.records: list[Record] = []  # list.append is atomic: the threads share it
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)]
        self.t0 = time.monotonic()
        self.timeout = timeout  # a request without an answer by then counts as hung
        self.deadline = self.t0 + max_seconds

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> list[Record]:
        self.stopping.set()
        for t in self.threads:  # each finishes its request in flight: it gets an outcome too
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self.threads), "a client thread outlived its socket timeout"
        return sorted(self.records, key=lambda r: r.start)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn: http.client.HTTPConnection | None = None
        status: int | str
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            i = rng.randrange(len(self.pngs))
            start = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                conn.request("POST", self.path, self.pngs[i], self.headers)
                response = conn.getresponse()
                status, body = response.status, response.read()
                version = response.getheader("X-Model-Version", "")
            except (OSError, http.client.HTTPException) as err:
                status, body, version = type(err).__name__, str(err).encode(), ""
                if conn is not None:
                    conn.close()
                conn = None
            seconds = time.monotonic() - start
            detail = "" if status == 200 else " ".join(body[:160].decode(errors="replace").split())
            wrong = status == 200 and digit_of(body) != self.expected[i]
            self.records.append(Record(start - self.t0, seconds, status, detail, wrong, version, i))
            if isinstance(status, str):
                time.sleep(0.05)  # no server to talk to: retry, but don't spin

