"""Fault injection against a live TorchServe: `make chaos`, `python -m serving.chaos`.

Archives the checkpoint into a temporary model store, starts the project's TorchServe
(serving/server.py) on free loopback ports and runs each scenario under load, then prints a
Markdown report. Every loop is bounded in time and stops by itself.

  inputs   a corpus of bad requests: status and message of each; the worker must survive them all
  kill     kill -9 the worker under steady load: every request's outcome, time to full throughput
  sigterm  SIGTERM the frontend under load: time until every process is gone, then a clean restart
           on the same run directory and ports
  soak     ~70% of measured capacity for --soak-seconds: errors, p50/p99 per minute, RSS start/end
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import psutil
import torch
import yaml

from serving.archive import DEFAULT_VARIANT, MODEL_CONFIG, build_archive
from serving.bench import WRK_SCRIPT, Sampler, run_wrk, write_digits
from serving.handler import serving_model, to_model_input
from serving.server import ServerError, TorchServe, port_is_free
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

SCENARIOS = ("inputs", "kill", "sigterm", "soak")
RESPONSE_TIMEOUT = float(yaml.safe_load(MODEL_CONFIG.read_text())["responseTimeout"])  # s, packed in the .mar
CLIENT_TIMEOUT = RESPONSE_TIMEOUT + 2  # a request without an answer by then counts as hung


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # progress; the report goes to stdout


@dataclass
class Record:
    start: float  # seconds since the load started
    seconds: float
    status: int | str  # HTTP status, or the exception a client saw instead of an answer
    detail: str  # start of the body (or exception message) when not 200
    wrong: bool

    @property
    def end(self) -> float:
        return self.start + self.seconds


class Load:
    """`threads` keep-alive HTTP clients posting MNIST digits as fast as answers come back.

    Every request's outcome is recorded; a 200 is checked against the offline model's answer.
    """

    def __init__(self, server: TorchServe, pngs: list[bytes], expected: list[int], threads: int,
                 max_seconds: float):
        url = urlsplit(server.url("inference"))
        self.host, self.port = url.hostname, url.port
        self.path = f"/predictions/{server.model_name}"
        self.headers = {"Content-Type": "application/octet-stream",
                        "Authorization": f"Bearer {server.token('inference')}"}
        self.pngs, self.expected = pngs, expected
        self.records: list[Record] = []  # list.append is atomic: the threads share it
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)]
        self.t0 = time.monotonic()
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
            t.join(CLIENT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self.threads), "a client thread outlived its socket timeout"
        return sorted(self.records, key=lambda r: r.start)

    def _client(self, seed: int) -> None:
        rng, conn = random.Random(seed), None
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            i = rng.randrange(len(self.pngs))
            start = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=CLIENT_TIMEOUT)
                conn.request("POST", self.path, self.pngs[i], self.headers)
                response = conn.getresponse()
                status, body = response.status, response.read()
            except (OSError, http.client.HTTPException) as err:
                status, body = type(err).__name__, str(err).encode()
                conn.close()
                conn = None
            seconds = time.monotonic() - start
            detail = "" if status == 200 else " ".join(body[:160].decode(errors="replace").split())
            wrong = status == 200 and _digit(body) != self.expected[i]
            self.records.append(Record(start - self.t0, seconds, status, detail, wrong))
            if isinstance(status, str):
                time.sleep(0.05)  # no server to talk to: retry, but don't spin


def _digit(body: bytes) -> int:
    try:
        return json.loads(body)["digit"]
    except (ValueError, KeyError, TypeError):
        return -1


# --- reporting -----------------------------------------------------------------------------------

def outcome_table(records: list[Record]) -> list[str]:
    ok = sum(r.status == 200 for r in records)
    hung = sum(r.seconds > RESPONSE_TIMEOUT for r in records)
    slowest = max((r.seconds for r in records), default=0.0)
    lines = [f"| requests | ok | failed | hung (> {RESPONSE_TIMEOUT:.0f} s) | wrong answers | slowest |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {len(records)} | {ok} | {len(records) - ok} | {hung} | {sum(r.wrong for r in records)} | "
             f"{slowest:.2f} s |"]
    failures = Counter((str(r.status), r.detail) for r in records if r.status != 200)
    if failures:
        lines += ["", "| failed requests | status | body (or client error) |", "|---:|---|---|"]
        lines += [f"| {n} | {status} | `{detail}` |" for (status, detail), n in failures.most_common()]
    return lines


def ok_between(records: list[Record], start: float, end: float) -> int:
    return sum(r.status == 200 and start <= r.end < end for r in records)


def rss_mb(server: TorchServe) -> dict[str, float]:
    frontend = psutil.Process(server.running_pid())
    sizes = {"frontend": frontend.memory_info().rss / 2**20}
    for p in frontend.children(recursive=True):
        sizes[f"worker {p.pid}"] = p.memory_info().rss / 2**20
    return sizes


# --- scenarios -----------------------------------------------------------------------------------

@dataclass
class Harness:
    server: TorchServe
    pngs: list[bytes]
    expected: list[int]
    threads: int
    work: Path


def bad_inputs(png: bytes) -> dict[str, tuple[bytes, str]]:
    """name: (body, content type) of requests a client might get wrong, or an attacker might try."""
    def as_json(obj: object) -> bytes:
        return json.dumps(obj).encode()

    boundary = "chaos-boundary"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="7.png"\r\n\r\n').encode() \
        + png + f"\r\n--{boundary}--\r\n".encode()
    bomb = cv2.imencode(".png", np.zeros((12000, 12000), np.uint8))[1].tobytes()  # 144 MB of pixels in ~140 KB
    tiny = cv2.imencode(".png", np.full((1, 1), 255, np.uint8))[1].tobytes()
    tiff = cv2.imencode(".tiff", np.full((28, 28), 255, np.uint8))[1].tobytes()
    return {
        "empty body": (b"", "application/octet-stream"),
        "random bytes (4 KiB)": (random.Random(0).randbytes(4096), "application/octet-stream"),
        "truncated PNG": (png[: len(png) // 2], "image/png"),
        "text": (b"seven", "text/plain"),
        "malformed JSON": (b'{"data": ', "application/json"),
        "bad base64": (as_json({"data": "not base64!"}), "application/json"),
        "JSON without an image": (as_json({"image": "7.png"}), "application/json"),
        "wrong pixel shape (27x28)": (as_json({"pixels": [[0] * 28] * 27}), "application/json"),
        "pixel value 300": (as_json({"pixels": [[300] * 28] * 28}), "application/json"),
        "pixel value 1e400 (integer)": (b'{"pixels": [[1' + b"0" * 400 + b"]]}", "application/json"),
        "1x1 PNG": (tiny, "image/png"),
        "TIFF image": (tiff, "image/tiff"),
        f"12000x12000 PNG ({len(bomb) // 1000} KB)": (bomb, "image/png"),
        "body over max_request_size (1 MiB + 1)": (b"\0" * (2**20 + 1), "application/octet-stream"),
        "PNG as form-urlencoded": (png, "application/x-www-form-urlencoded"),
        "PNG as application/json": (png, "application/json"),
        "PNG as text/plain": (png, "text/plain"),
        "multipart without data/file": (form, f"multipart/form-data; boundary={boundary}"),
    }


def scenario_inputs(h: Harness, rounds: int = 5) -> list[str]:
    (worker,) = h.server.describe()["workers"]
    lines = ["## Bad input over HTTP", "",
             "Each request sent once, alone, with a valid inference token.", "",
             "| input | content type | status | answer |", "|---|---|---:|---|"]
    corpus = bad_inputs(h.pngs[0])
    for name, (body, content_type) in corpus.items():
        status, raw = h.server.request("inference", f"/predictions/{h.server.model_name}", data=body,
                                       headers={"Content-Type": content_type}, timeout=CLIENT_TIMEOUT)
        answer = f"digit {_digit(raw)}" if status == 200 else \
            " ".join(raw[:120].decode(errors="replace").split()) or "(empty body)"
        lines.append(f"| {name} | {content_type.split(';')[0]} | {status} | `{answer}` |")
    status, answer = h.server.predict(h.pngs[0])
    (after,) = h.server.describe()["workers"]
    lines += ["", f"- then a valid digit: {status}, digit {answer.get('digit')} (offline model: {h.expected[0]}); "
              f"worker pid {worker['pid']} before, {after['pid']} after, status {after['status']}"]

    # Does a bad request fail only itself? It is sent at the same moment as 15 good digits, so that
    # they share batches (batchSize 32, maxBatchDelay 5 ms).
    for name in ("pixel value 300", "pixel value 1e400 (integer)"):
        requests = [corpus[name], *((png, "application/octet-stream") for png in h.pngs[1:16])]
        failed = 0
        for _ in range(rounds):
            barrier = threading.Barrier(len(requests))

            def send(request: tuple[bytes, str], barrier=barrier) -> tuple[int, dict]:
                barrier.wait()
                return h.server.predict(*request)

            with ThreadPoolExecutor(len(requests)) as pool:
                answers = list(pool.map(send, requests))[1:]
            failed += sum((status, body.get("digit")) != (200, digit)
                          for (status, body), digit in zip(answers, h.expected[1:16], strict=True))
        lines.append(f"- '{name}' sent at once with 15 good digits, {rounds} times: "
                     f"{failed}/{15 * rounds} good requests not answered correctly")
    return lines


def scenario_kill(h: Harness, warm: float = 3, before: float = 5, max_after: float = 60) -> list[str]:
    load = Load(h.server, h.pngs, h.expected, h.threads, max_seconds=warm + before + max_after + 10).start()
    time.sleep(warm + before)
    (worker,) = h.server.describe()["workers"]
    killed_at = load.now()
    os.kill(worker["pid"], signal.SIGKILL)
    say(f"kill: worker pid {worker['pid']} killed at {killed_at:.1f}s")
    rate = ok_between(load.records, killed_at - before, killed_at) / before  # answers/s just before the kill
    ready_at = recovered_at = new_pid = None
    window = killed_at  # throughput is back at the first 1-s window (in 0.1-s steps) with >= 90% of `rate`
    while load.now() < killed_at + max_after and (recovered_at is None or ready_at is None):
        time.sleep(0.2)
        if ready_at is None:
            try:
                workers = h.server.describe()["workers"]
            except ServerError:
                workers = []
            if [w["status"] for w in workers] == ["READY"] and workers[0]["pid"] != worker["pid"]:
                ready_at, new_pid = load.now(), workers[0]["pid"]
        after = [r for r in load.records if r.end >= window]
        while recovered_at is None and window + 1 < load.now() - 0.1:
            if ok_between(after, window, window + 1) >= 0.9 * rate:
                recovered_at = window
            window += 0.1
    time.sleep(2)
    records = load.stop()
    after = [r for r in records if r.end >= killed_at]
    first_ok = min((r.end for r in after if r.status == 200), default=None)

    def since_kill(t: float | None) -> str:
        return "never" if t is None else f"{t - killed_at:.2f} s"

    lines = ["## kill -9 the worker under load", "",
             f"{h.threads} keep-alive clients, each posting the next of {len(h.pngs)} MNIST test digits as soon "
             f"as the last answer arrived (client timeout {CLIENT_TIMEOUT:.0f} s). Worker pid {worker['pid']} "
             f"killed {killed_at:.1f} s into the load, at {rate:.0f} answers/s.", "",
             *outcome_table(records), "",
             f"- worker restarted as pid {new_pid}, READY {since_kill(ready_at)} after the kill",
             f"- first answer after the kill: {since_kill(first_ok)}; throughput back to >= 90% of the rate before "
             f"it: the first 1-s window with >= {0.9 * rate:.0f} answers starts {since_kill(recovered_at)} after "
             "the kill",
             f"- requests that were in flight or sent after the kill: {len(after)}, of which "
             f"{sum(r.status != 200 for r in after)} failed", "",
             "| s after kill | ok | failed |", "|---:|---:|---:|"]
    for second in range(-2, int((recovered_at or killed_at + 5) - killed_at) + 3):
        window = [r for r in records if second <= r.end - killed_at < second + 1]
        ok = sum(r.status == 200 for r in window)
        lines.append(f"| {second} | {ok} | {len(window) - ok} |")
    return lines


def scenario_sigterm(h: Harness, under_load: float = 3, bound: float = 60) -> list[str]:
    load = Load(h.server, h.pngs, h.expected, h.threads, max_seconds=under_load + bound + 10).start()
    time.sleep(under_load)
    frontend = psutil.Process(h.server.running_pid())
    processes = [frontend, *frontend.children(recursive=True)]
    names = {p.pid: "frontend" if p is frontend else "worker" for p in processes}
    gone_at: dict[int, float] = {}
    sent_at = load.now()
    frontend.send_signal(signal.SIGTERM)
    say(f"sigterm: sent to frontend pid {frontend.pid}")
    _, alive = psutil.wait_procs(processes, timeout=bound, callback=lambda p: gone_at.setdefault(p.pid, load.now()))
    stopped_in = load.now() - sent_at
    time.sleep(1)
    records = load.stop()
    for p in alive:  # still there after `bound`: report it, then make sure it goes
        p.kill()
    run_dir = h.server.run_dir
    leftovers = sorted(str(p.relative_to(run_dir)) for p in
                       [h.server.pid_file, run_dir / "key_file.json", *(run_dir / "tmp").glob(".ts.sock*")]
                       if p.exists())
    busy = [kind for kind, url in h.server.addresses.items() if not port_is_free(*_host_port(url))]

    restarted = TorchServe(run_dir=h.server.run_dir, model_store=h.server.model_store,
                           model_name=h.server.model_name, addresses=h.server.addresses,
                           extra_properties=h.server.extra_properties)
    start = time.monotonic()
    restarted.start(timeout=180)
    start_seconds = time.monotonic() - start
    answers = [restarted.predict(png) for png in h.pngs[:50]]
    right = sum(status == 200 and body.get("digit") == e
                for (status, body), e in zip(answers, h.expected, strict=False))
    h.server = restarted

    after = [r for r in records if r.end >= sent_at]
    last_ok = max((r.end - sent_at for r in after if r.status == 200), default=None)
    first_failed = min((r.end - sent_at for r in after if r.status != 200), default=None)
    processes_line = ", ".join(f"{names[pid]} {pid} after {t - sent_at:.2f} s" for pid, t in sorted(gone_at.items()))
    return ["## SIGTERM to the frontend under load", "",
            f"{h.threads} keep-alive clients for {under_load:.0f} s, then SIGTERM to the frontend "
            f"(pid {frontend.pid}) and its {len(processes) - 1} worker(s) watched for up to {bound:.0f} s.", "",
            f"- all {len(processes)} processes gone {stopped_in:.2f} s after SIGTERM ({processes_line})"
            + (f"; {len(alive)} still alive after {bound:.0f} s and SIGKILLed" if alive else ""),
            f"- left behind in the run directory: {', '.join(leftovers) or 'nothing'}; "
            f"ports still bound: {', '.join(busy) or 'none'}",
            f"- restart on the same run directory and ports: READY in {start_seconds:.1f} s, "
            f"{right}/{len(answers)} test digits answered correctly", "",
            "Requests answered (or failed) from the SIGTERM until 1 s after the last process exited:", "",
            *outcome_table(after), "",
            f"- last answer {'none' if last_ok is None else f'{last_ok:.2f} s'} after SIGTERM, first failure "
            f"{'none' if first_failed is None else f'{first_failed:.2f} s'} after it"]


def scenario_soak(h: Harness, seconds: int) -> list[str]:
    script = h.work / "chaos.lua"
    script.with_suffix(".txt").write_text("\n".join(str(p) for p in sorted((h.work / "digits").glob("*.png"))) + "\n")
    script.write_text(WRK_SCRIPT % {"list": script.with_suffix(".txt"), "token": h.server.token("inference")})
    run_wrk(h.server, script, 8, 3)  # warm-up
    capacity = run_wrk(h.server, script, 64, 8)["rps"]
    target = 0.7 * capacity
    # wrk is closed-loop (wrk2 would hold a rate): fewer connections mean fewer requests in flight,
    # so the soak uses the connection count whose short trial came nearest 70% of capacity.
    trials: dict[int, float] = {}
    for c in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48):
        trials[c] = run_wrk(h.server, script, c, 3)["rps"]
        if trials[c] >= target:
            break
    connections = min(trials, key=lambda c: abs(trials[c] - target))
    say(f"soak: capacity {capacity:.0f}/s at c=64; {connections} connections ({trials[connections]:.0f}/s) "
        f"for {seconds}s")
    sampler = Sampler(h.server, h.pngs, h.expected, _digit, limit=seconds * 60)
    sampler.start()
    rss_start, rows = rss_mb(h.server), []
    left = seconds
    while left > 0:
        chunk = min(60, left)
        rows.append({**run_wrk(h.server, script, connections, chunk), "rss": rss_mb(h.server),
                     "load": os.getloadavg()[0]})
        left -= chunk
        say(f"soak: {seconds - left}s done, {rows[-1]['rps']:.0f}/s, p99 {rows[-1]['p99']:.1f} ms")
    sampler.stop_flag.set()
    sampler.join()
    errors = sum(r["non2xx"] + r["socket_errors"] for r in rows)
    lines = ["## Soak at ~70% of capacity", "",
             f"Capacity: {capacity:.0f} req/s (wrk, 64 connections, 8 s). Trials (3 s each): "
             + ", ".join(f"c={c}: {rps:.0f}/s" for c, rps in trials.items())
             + f". Soak: wrk with {connections} keep-alive connections for {seconds} s in chunks of at most 60 s, "
             f"plus a checker posting digits one at a time and comparing each answer with the offline model.", "",
             f"- errors: {errors} from wrk (non-2xx + socket errors) and {sampler.failed} from the checker; "
             f"wrong answers {sampler.wrong}/{sampler.checked}",
             "", "| minute | req/s | % of capacity | p50 ms | p99 ms | max ms | errors | frontend RSS MB "
             "| worker RSS MB | load average |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        workers = " + ".join(f"{v:.0f}" for k, v in r["rss"].items() if k != "frontend")
        lines.append(f"| {i} | {r['rps']:.0f} | {r['rps'] / capacity:.0%} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['max']:.1f} | {r['non2xx'] + r['socket_errors']} | {r['rss']['frontend']:.0f} | {workers} | "
                     f"{r['load']:.1f} |")
    p99 = [r["p99"] for r in rows]
    lines += ["", f"- p99 per minute from {min(p99):.1f} to {max(p99):.1f} ms",
              "- RSS at start -> end (MB): " + "; ".join(
                  f"{k} {rss_start.get(k, float('nan')):.0f} -> {rows[-1]['rss'].get(k, float('nan')):.0f}"
                  for k in dict.fromkeys([*rss_start, *rows[-1]["rss"]]))]
    return lines


def other_jobs(seconds: float = 1.0) -> str:
    """The busiest other processes: on a shared machine they explain slow or noisy numbers."""
    processes = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()]
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent()  # starts the measurement
    time.sleep(seconds)
    busy = []
    for p in processes:
        try:
            cpu = p.cpu_percent()
        except psutil.Error:
            continue
        if cpu >= 10:
            busy.append((cpu, " ".join((p.info["cmdline"] or [p.name()])[:4])[:70]))
    return ", ".join(f"`{name}` ({cpu:.0f}% CPU)" for cpu, name in sorted(busy, reverse=True)[:4]) or "none"


# --- setup ---------------------------------------------------------------------------------------

def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def expected_digits(checkpoint: Path, images: torch.Tensor) -> list[int]:
    """What the served model answers, computed offline the way the worker runs it."""
    model = serving_model(model_from_checkpoint(load_checkpoint(checkpoint)), DEFAULT_VARIANT)
    with torch.inference_mode():
        return model(to_model_input(images)).argmax(1).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--soak-seconds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8, help="client threads for kill and sigterm")
    parser.add_argument("--digits", type=int, default=200, help="distinct MNIST test digits sent")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}: choose from {', '.join(SCENARIOS)}")
    if "soak" in scenarios and shutil.which("wrk") is None:
        print("error: the soak needs wrk (Debian/Ubuntu: sudo apt-get install wrk)", file=sys.stderr)
        return 1
    load_before, jobs_before = os.getloadavg(), other_jobs()
    report = []
    with tempfile.TemporaryDirectory(prefix="mnist-chaos-") as tmp:
        work = Path(tmp)
        try:
            build_archive(args.checkpoint, work / "store", "mnist", "1.0")
            paths, images, _ = write_digits(work / "digits", args.digits, None)
            server = TorchServe.on_free_ports(work / "run", work / "store")
            say(f"starting TorchServe from {work}")
            server.start(timeout=180)
        except (CheckpointError, ServerError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        h = Harness(server, [p.read_bytes() for p in paths], expected_digits(args.checkpoint, images),
                    args.threads, work)
        try:
            for name in scenarios:
                say(f"scenario {name}")
                run = {"inputs": scenario_inputs, "kill": scenario_kill, "sigterm": scenario_sigterm,
                       "soak": lambda h: scenario_soak(h, args.soak_seconds)}[name]
                report += ["", *run(h)]
        finally:
            h.server.stop()
    print(f"# Chaos report\n\n{os.cpu_count()} CPUs, 1-minute load average {load_before[0]:.1f} at the start "
          f"and {os.getloadavg()[0]:.1f} at the end; checkpoint {args.checkpoint}; torch {torch.__version__}; "
          f"`{' '.join(['python -m serving.chaos', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
          f"Other processes using CPU at the start: {jobs_before}; at the end: {other_jobs()}.")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
