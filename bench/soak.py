"""A long run under faults: `make soak` (`python -m bench.soak`), bounded in time, loopback only.

A TorchServe of its own on free loopback ports (bench/rollout.py's: model API on, archives signed with a
throwaway key) serving the checkpoint as version 1.0, with the same checkpoint registered beside it as
2.0. For --minutes, --clients keep-alive clients (bench/load.py) post a mix of MNIST test digits and the
worst-case images of bench/worst_cases.py, and every --fault-every seconds comes the next fault in turn:

    kill       kill -9 the youngest worker of the default version (the oldest live through the run,
               so their memory shows a leak)
    promote    2.0 becomes the default; the next time, rollback: 1.0 again

Every answer is compared with the offline one (same checkpoint, same preprocessing: a digit, or a 400
refusal). The checks: no wrong answer; no request lost (no answer, or an error other than the expected
400) except those in flight in a worker when it was killed; every worker alive from the end of the
warm-up to the end grew by at most 10% in RSS. Writes a record (results/) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from bench.chaos import expected_digits
from bench.load import Load, Record, p99_ms
from bench.record import markdown_tables, write_record
from bench.report import worker_rss
from bench.rollout import digits, serve_old_beside_new
from bench.scenarios import CLIENT_TIMEOUT, say
from bench.worst_cases import worst_cases
from serving import lifecycle
from serving.server import TorchServe
from training.core.inputs.preprocess import PreprocessError, preprocess_bytes

REFUSED = -2  # the offline answer for an input the handler refuses with a 400
MAX_RSS_GROWTH = 0.10
KILL_NOTICED = 3.0  # s: a loaded machine's frontend may take a while to see the socket close


@dataclass
class Soak:
    seconds: float
    records: list[Record]
    kills: list[float] = field(default_factory=list)  # load-clock times of each kill -9
    switches: list[str] = field(default_factory=list)  # "promote 2.0 (0.41 s)", "rollback 1.0 (0.12 s)"
    rss_start: dict[int, float] = field(default_factory=dict)  # worker pid → MB after the warm-up
    rss_end: dict[int, float] = field(default_factory=dict)


def offline_answers(checkpoint: Path, bodies: list[bytes]) -> list[int]:
    """What the server must answer for each body: the served model's digit, or REFUSED."""
    arrays: dict[int, np.ndarray] = {}
    for i, body in enumerate(bodies):
        with contextlib.suppress(PreprocessError):  # refused: stays out of `arrays`
            arrays[i] = preprocess_bytes(body)
    digits_ = expected_digits(checkpoint, torch.from_numpy(np.stack(list(arrays.values()))))
    answers = dict(zip(arrays, digits_, strict=True))
    return [answers.get(i, REFUSED) for i in range(len(bodies))]


def kill_youngest_worker(server: TorchServe, clock: Callable[[], float]) -> tuple[int, float]:
    """(pid, `clock()` at the kill) of the youngest READY worker of the default version; (0, 0) if none.
    The time is read at the signal, not before the management calls that find the worker: those take
    a while under load, and requests sent meanwhile join the dying worker's batch."""
    version = lifecycle.default_version(server)
    status, body = server.request("management", f"/models/{server.model_name}/{version}")
    pids = [w["pid"] for w in json.loads(body)[0]["workers"] if w["status"] == "READY"] if status == 200 else []
    if not pids:  # none ready (one is still coming back from the last kill): wait for the next turn
        return 0, 0.0
    pid = max(pids, key=lambda p: psutil.Process(p).create_time())
    at = clock()
    os.kill(pid, signal.SIGKILL)
    return pid, at


def switch_default(server: TorchServe, turn: int, new: str) -> str:
    start = time.monotonic()
    if turn % 2 == 0:
        lifecycle.promote(server, new)
        what = f"promote {new}"
    else:
        lifecycle.rollback(server)
        what = "rollback"
    return f"{what} ({time.monotonic() - start:.2f} s)"


def warm_every_version(server: TorchServe, bodies: list[bytes], rounds: int = 4) -> None:
    """Every body `rounds` times to each registered version, 8 at a time (so both workers of each get them):
    the version beside the default gets no traffic until it is promoted, and its workers' memory would
    otherwise grow then, after the RSS baseline is taken."""
    paths = [f"/predictions/{server.model_name}/{m['modelVersion']}" for m in lifecycle.registered(server)]

    def post(job: tuple[str, bytes]) -> None:
        server.request("inference", job[0], data=job[1], timeout=CLIENT_TIMEOUT,
                       headers={"Content-Type": "application/octet-stream"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, [(path, body) for path in paths for _ in range(rounds) for body in bodies]))


def run(server: TorchServe, bodies: list[bytes], expected: list[int], seconds: float, clients: int = 32,
        fault_every: float = 90, warm_up: float = 60, new: str = "2.0") -> Soak:
    """The load for `seconds` (warm-up included), with a fault every `fault_every` seconds after the warm-up."""
    load = Load(server, bodies, expected, clients, max_seconds=seconds + 60, timeout=CLIENT_TIMEOUT).start()
    soak = Soak(seconds, [])
    try:
        time.sleep(warm_up)
        soak.rss_start = worker_rss(server)
        turn, next_fault = 0, warm_up + fault_every / 2
        while load.now() < seconds:
            time.sleep(min(1.0, max(0.0, min(seconds, next_fault) - load.now())))
            if load.now() < next_fault or load.now() >= seconds:
                continue
            if turn % 2 == 0:
                pid, at = kill_youngest_worker(server, load.now)
                if pid:
                    soak.kills.append(at)
                    say(f"soak: {at:.0f} s, killed worker {pid}")
            else:
                soak.switches.append(switch_default(server, turn // 2, new))
                say(f"soak: {load.now():.0f} s, {soak.switches[-1]}")
            turn, next_fault = turn + 1, next_fault + fault_every
        soak.rss_end = worker_rss(server)
    finally:
        soak.records = load.stop()
    return soak


@dataclass
class Counts:
    requests: int
    worst_case: int  # of which worst-case images
    answered: int  # a 200 with the offline digit
    refused: int  # a 400 where the offline answer is a refusal
    wrong: list[Record]  # an answer that contradicts the offline one (digit, or 200 vs 400)
    lost_in_killed_batch: list[Record]
    lost: list[Record]  # no answer, or an error, outside a killed worker's batch
    rss_growth: dict[int, float]  # surviving worker pid → growth from the warm-up's end


def killed_batch(r: Record, kills: list[float]) -> bool:
    """Failed with TorchServe's "Worker died." and in flight at a kill: sent before it, or within
    KILL_NOTICED after it (until the frontend sees the worker's socket close, it still hands it batches)."""
    return "Worker died" in r.detail and any(r.start <= kill + KILL_NOTICED and r.end >= kill for kill in kills)


def count(soak: Soak, expected: list[int], ordinary: int) -> Counts:
    answered = refused = 0
    wrong, in_batch, lost = [], [], []
    for r in soak.records:
        want = expected[r.item]
        if r.status == 200 and not r.wrong:
            answered += 1
        elif r.status == 400 and want == REFUSED:
            refused += 1
        elif r.status in (200, 400):
            wrong.append(r)
        elif killed_batch(r, soak.kills):
            in_batch.append(r)
        else:
            lost.append(r)
    growth = {pid: soak.rss_end[pid] / mb - 1 for pid, mb in soak.rss_start.items() if pid in soak.rss_end}
    return Counts(len(soak.records), sum(r.item >= ordinary for r in soak.records), answered, refused, wrong,
                  in_batch, lost, growth)


def report(soak: Soak, counts: Counts, clients: int, ordinary: int) -> list[str]:
    growth = max(counts.rss_growth.values(), default=float("nan"))
    rss = "; ".join(f"{soak.rss_start[p]:.0f} → {soak.rss_end[p]:.0f}" for p in counts.rss_growth)
    rows = [
        ("duration", f"{soak.seconds / 60:.1f} min at c={clients}", "", ""),
        ("requests", f"{counts.requests:,} ({counts.worst_case:,} worst-case images)", "", ""),
        ("answered with the offline digit", f"{counts.answered:,}", "", ""),
        ("refused (400) as offline", f"{counts.refused:,}", "", ""),
        ("wrong answers", str(len(counts.wrong)), "0", _ok(not counts.wrong)),
        ("lost in a killed worker's batch (\"Worker died.\")", str(len(counts.lost_in_killed_batch)), "allowed",
         ""),
        ("lost otherwise", str(len(counts.lost)), "0", _ok(not counts.lost)),
        ("kill -9 of a worker", str(len(soak.kills)), "", ""),
        ("promote / rollback", ", ".join(soak.switches) or "none", "", ""),
        ("p99 latency, digits / worst-case images",
         f"{p99_ms(r for r in soak.records if r.item < ordinary) or 0.0:.0f} / "
         f"{p99_ms(r for r in soak.records if r.item >= ordinary) or 0.0:.0f} ms", "", ""),
        ("RSS of the workers alive throughout (MB, after warm-up → end)", rss or "none survived", "", ""),
        ("largest RSS growth", f"{growth:+.1%}", f"≤ +{MAX_RSS_GROWTH:.0%}",
         _ok(bool(counts.rss_growth) and growth <= MAX_RSS_GROWTH)),
    ]
    return ["| check | figure | limit | pass |", "|---|---|---|---|",
            *(f"| {' | '.join(row)} |" for row in rows)]


def _ok(passed: bool) -> str:
    return "yes" if passed else "**no**"


def passed(counts: Counts) -> bool:
    return (not counts.wrong and not counts.lost and bool(counts.rss_growth)
            and max(counts.rss_growth.values()) <= MAX_RSS_GROWTH)


def soak_corpus(checkpoint: Path, count_: int, data_dir: str | None) -> tuple[list[bytes], list[int], int]:
    """(bodies, offline answers, how many of the first bodies are ordinary digits)."""
    pngs, _ = digits(count_, data_dir)
    bodies = [*pngs, *worst_cases().values()]
    return bodies, offline_answers(checkpoint, bodies), len(pngs)


def soak_own_server(checkpoint: Path, work: Path, bodies: list[bytes], expected: list[int], ordinary: int,
                    seconds: float, clients: int, fault_every: float, warm_up: float) -> Soak:
    """`run` on a server of its own in `work`: 1.0 the default, 2.0 (the same checkpoint) beside it."""
    server = serve_old_beside_new(checkpoint, checkpoint, work)
    try:
        lifecycle.deploy(server, server.model_store, "2.0")
        worst = len(bodies) - ordinary
        warm_every_version(server, bodies[ordinary - worst :])  # the worst cases, and as many digits
        return run(server, bodies, expected, seconds, clients, fault_every, warm_up)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--minutes", type=float, default=30, help="total, warm-up included (make soak DURATION=)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--fault-every", type=float, default=90, help="seconds between faults (kill, switch, ...)")
    parser.add_argument("--warm-up", type=float, default=60, help="seconds of load before RSS is first read")
    parser.add_argument("--digits", type=int, default=200, help="distinct MNIST test digits in the mix")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dry-run", action="store_true", help="90 s, a fault every 20 s, no record")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.minutes, args.fault_every, args.warm_up = 1.5, 20, 15
    bodies, expected, ordinary = soak_corpus(args.checkpoint, args.digits, args.data_dir)
    say(f"soak: {ordinary} digits + {len(bodies) - ordinary} worst-case images, {args.minutes:g} min")
    with tempfile.TemporaryDirectory(prefix="mnist-soak-") as tmp:
        soak = soak_own_server(args.checkpoint, Path(tmp), bodies, expected, ordinary, args.minutes * 60,
                               args.clients, args.fault_every, args.warm_up)
    counts = count(soak, expected, ordinary)
    lines = report(soak, counts, args.clients, ordinary)
    print("\n".join(lines))
    for r in (counts.wrong + counts.lost)[:10]:
        print(f"at {r.start:.2f} s, body {r.item}: {r.status} {r.detail}", file=sys.stderr)
    if args.dry_run:  # measures nothing worth keeping
        return 0 if passed(counts) else 1
    write_record("soak", {"tables": {"soak": markdown_tables("\n".join(lines))[0]}, "clients": args.clients,
                          "minutes": round(soak.seconds / 60, 2), "kills": len(soak.kills),
                          "switches": soak.switches, "passed": passed(counts)},
                 baseline={"rss": "each worker's own RSS after the warm-up, same run"})
    return 0 if passed(counts) else 1


if __name__ == "__main__":
    sys.exit(main())
