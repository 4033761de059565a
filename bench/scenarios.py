"""The fault scenarios `make chaos` runs against a live TorchServe; each returns Markdown lines.

  inputs   a corpus of bad requests: status and message of each; the worker must survive them all
  kill     kill -9 a worker under steady load: every request's outcome, time to full throughput
  sigterm  SIGTERM the frontend under load: time until every process is gone, then a clean restart
           on the same run directory and ports
  soak     ~70% of measured capacity for --soak-seconds: errors, p50/p99 per minute, RSS start/end
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from bench.inputs import bad_inputs
from bench.load import Load, Sampler, digit_of, run_wrk, write_wrk_script
from bench.report import ok_between, outcome_table, rss_mb
from serving.archive import MODEL_CONFIG
from serving.ports import host_port, port_is_free
from serving.server import ServerError, TorchServe

RESPONSE_TIMEOUT = float(yaml.safe_load(MODEL_CONFIG.read_text())["responseTimeout"])  # s, packed in the .mar
CLIENT_TIMEOUT = RESPONSE_TIMEOUT + 2  # a request without an answer by then counts as hung


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # progress; the report goes to stdout


# --- reporting -----------------------------------------------------------------------------------


@dataclass
class Harness:
    server: TorchServe
    pngs: list[bytes]
    expected: list[int]
    threads: int
    work: Path


def scenario_inputs(h: Harness, rounds: int = 5) -> list[str]:
    worker = h.server.describe()["workers"][0]
    lines = ["## Bad input over HTTP", "",
             "Each request sent once, alone, with a valid inference token.", "",
             "| input | content type | status | answer |", "|---|---|---:|---|"]
    corpus = bad_inputs(h.pngs[0])
    for name, bad in corpus.items():
        content_type = bad.content_type
        status, raw = h.server.request("inference", f"/predictions/{h.server.model_name}", data=bad.body,
                                       headers={"Content-Type": content_type}, timeout=CLIENT_TIMEOUT)
        answer = f"digit {digit_of(raw)}" if status == 200 else \
            " ".join(raw[:120].decode(errors="replace").split()) or "(empty body)"
        lines.append(f"| {name} | {content_type.split(';')[0]} | {status} | `{answer}` |")
    status, prediction = h.server.predict(h.pngs[0])
    after = h.server.describe()["workers"][0]
    lines += ["", f"- then a valid digit: {status}, digit {prediction.get('digit')} (offline model: {h.expected[0]}); "
              f"worker pid {worker['pid']} before, {after['pid']} after, status {after['status']}"]

    # Does a bad request fail only itself? It is sent at the same moment as 15 good digits, so that
    # they share batches (batchSize 32, maxBatchDelay 5 ms).
    for name in ("pixel value 300", "pixel value 1e400 (integer)"):
        bad = corpus[name]
        requests = [(bad.body, bad.content_type), *((png, "application/octet-stream") for png in h.pngs[1:16])]
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
    load = Load(h.server, h.pngs, h.expected, h.threads, max_seconds=warm + before + max_after + 10,
                timeout=CLIENT_TIMEOUT).start()
    time.sleep(warm + before)
    workers = h.server.describe()["workers"]
    worker = workers[0]  # one of them (configs/model-config.yaml: 2); the others keep serving
    count, before_pids = len(workers), {w["pid"] for w in workers}
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
            pids = [w["pid"] for w in workers]
            if [w["status"] for w in workers] == ["READY"] * count and worker["pid"] not in pids:
                ready_at, new_pid = load.now(), next(p for p in pids if p not in before_pids)
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

    lines = ["## kill -9 a worker under load", "",
             f"{h.threads} keep-alive clients, each posting the next of {len(h.pngs)} MNIST test digits as soon "
             f"as the last answer arrived (client timeout {CLIENT_TIMEOUT:.0f} s). Worker pid {worker['pid']} "
             f"(one of {count}) killed {killed_at:.1f} s into the load, at {rate:.0f} answers/s.", "",
             *outcome_table(records, RESPONSE_TIMEOUT), "",
             f"- worker restarted as pid {new_pid}, READY {since_kill(ready_at)} after the kill",
             f"- first answer after the kill: {since_kill(first_ok)}; throughput back to >= 90% of the rate before "
             f"it: the first 1-s window with >= {0.9 * rate:.0f} answers starts {since_kill(recovered_at)} after "
             "the kill",
             f"- requests that were in flight or sent after the kill: {len(after)}, of which "
             f"{sum(r.status != 200 for r in after)} failed", "",
             "| s after kill | ok | failed |", "|---:|---:|---:|"]
    for second in range(-2, int((recovered_at or killed_at + 5) - killed_at) + 3):
        in_second = [r for r in records if second <= r.end - killed_at < second + 1]
        ok = sum(r.status == 200 for r in in_second)
        lines.append(f"| {second} | {ok} | {len(in_second) - ok} |")
    return lines


def scenario_sigterm(h: Harness, under_load: float = 3, bound: float = 60) -> list[str]:
    load = Load(h.server, h.pngs, h.expected, h.threads, max_seconds=under_load + bound + 10,
                timeout=CLIENT_TIMEOUT).start()
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
    busy = [kind for kind, url in h.server.addresses.items() if not port_is_free(*host_port(url))]

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
            *outcome_table(after, RESPONSE_TIMEOUT), "",
            f"- last answer {'none' if last_ok is None else f'{last_ok:.2f} s'} after SIGTERM, first failure "
            f"{'none' if first_failed is None else f'{first_failed:.2f} s'} after it"]


def scenario_soak(h: Harness, seconds: int) -> list[str]:
    script = write_wrk_script(h.work / "chaos.lua", sorted((h.work / "digits").glob("*.png")),
                              h.server.token("inference") or "")
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
    sampler = Sampler(h.server, h.pngs, h.expected, digit_of, limit=seconds * 60)
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


# --- setup ---------------------------------------------------------------------------------------
