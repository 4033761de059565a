"""Where a serving worker's time goes under load: `python -m bench.profile` (py-spy, needs ptrace rights: root).

Starts the project's TorchServe on free loopback ports, drives it with wrk at one concurrency, and
samples the Python worker with `py-spy record` meanwhile. Each sample's stack is put in the first
bucket whose pattern it contains (model, decode, JSON, TorchServe's socket protocol, metrics, ...), so
the table says what share of the worker's time each stage takes; the top functions by own time follow.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.load import run_wrk, write_digits, write_wrk_script
from bench.report import machine_line
from serving.archive import MODEL_CONFIG, build_archive
from serving.server import LOG4J, TorchServe
from serving.worker.variants import DEFAULT_VARIANT

# The venv's own py-spy first: `make` runs without the venv on PATH.
_VENV_SPY = Path(sys.executable).with_name("py-spy")
PY_SPY = str(_VENV_SPY) if _VENV_SPY.is_file() else "py-spy"
# (bucket, substrings of a stack frame "function (file:line)"); first match wins, checked from the leaf.
BUCKETS = (
    ("model forward", ("torch/nn/", "forward (", "_call_impl", "features_and_logits (", "ood_score (")),
    ("decode (PNG → 28×28)", ("preprocess.py", "imdecode")),
    ("normalise + batch", ("to_model_input", "normalize", "stack (")),
    ("JSON response", ("prediction_body", "json/encoder", "json/__init__")),
    ("metrics", ("_record_metrics", "metric_buffer", "_emit_metric", "ts/metrics/")),
    ("handler's own Python (batch loop, response headers)", ("MNISTHandler.handle (", "set_response_")),
    ("TorchServe protocol (socket, (un)pickling)", ("ts/protocol/", "otf_message_handler", "recv", "sendall",
                                                    "model_service_worker")),
)


def bucket_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # the leaf first: the frame that was actually running
        for name, patterns in BUCKETS:
            if any(p in frame for p in patterns):
                return name
    return "other"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def log_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.rglob("*.log"))


def profile(store: Path, run_dir: Path, digits: list[Path], concurrency: int, seconds: int, rate: int,
            stock_logging: bool = False) -> tuple[dict, collections.Counter, collections.Counter, dict[str, float],
                                                  float]:
    """(wrk's result, samples per bucket, samples per leaf frame, CPU cores each process used under load and
    the MB/s of log lines the server wrote meanwhile)."""
    server = TorchServe.on_free_ports(run_dir, store, model_name="mnist", log_config=None if stock_logging else LOG4J)
    server.start(timeout=180)
    try:
        pids = [w["pid"] for w in server.describe()["workers"]]  # every worker: their samples add up
        script = write_wrk_script(run_dir / "load.lua", digits, server.token("inference") or "")
        run_wrk(server, script, 8, 2)  # warm-up
        raws = [run_dir / f"samples-{pid}.txt" for pid in pids]
        spies = [subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
                                   str(rate), "--format", "raw", "--output", str(raw), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for pid, raw in zip(pids, raws, strict=True)]
        # Who used the cores during the load: the Java frontend, each worker, and wrk (a child of this
        # process, so in RUSAGE_CHILDREN once it has ended). py-spy's own share is the rest.
        processes = {"frontend (Java)": psutil.Process(server.running_pid()),
                     **{f"worker {i + 1}": psutil.Process(pid) for i, pid in enumerate(pids)}}
        before = {name: cpu_seconds(p) for name, p in processes.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        logged = log_bytes(run_dir)
        started = time.monotonic()
        result = run_wrk(server, script, concurrency, seconds)
        elapsed = time.monotonic() - started
        cores = {name: (cpu_seconds(p) - before[name]) / elapsed for name, p in processes.items()}
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        cores["wrk"] = (done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime) / elapsed
        log_rate = (log_bytes(run_dir) - logged) / elapsed / 1e6
        for spy in spies:
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0:
                raise SystemExit(f"error: py-spy failed ({spy.returncode}): {err.strip()[-300:]}")
    finally:
        server.stop()
    buckets: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    for line in (line for raw in raws for line in raw.read_text().splitlines()):
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        buckets[bucket_of(stack)] += int(count)
        leaves[stack.split(";")[-1]] += int(count)
    return result, buckets, leaves, cores, log_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--variant", default=DEFAULT_VARIANT)
    parser.add_argument("--model-config", default=MODEL_CONFIG, type=Path)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--stock-logging", action="store_true",
                        help="TorchServe's own log4j2.xml instead of configs/log4j2.xml (what it costs)")
    args = parser.parse_args(argv)
    for tool in ("wrk", PY_SPY):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH (wrk: make system-deps; py-spy: pip install py-spy)", file=sys.stderr)
            return 1
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="mnist-profile-") as tmp:
        work = Path(tmp)
        digits, _, _ = write_digits(work / "digits", 200, None)
        build_archive(args.checkpoint, work / "store", "mnist", "1.0", args.variant, model_config=args.model_config)
        result, buckets, leaves, cores, log_rate = profile(work / "store", work / "run", digits, args.concurrency,
                                                           args.seconds, args.rate, args.stock_logging)
    total = sum(buckets.values()) or 1
    print(f"\n{result['rps']:,.0f} req/s at c={args.concurrency}, p50 {result['p50']:.1f} ms, "
          f"p99 {result['p99']:.1f} ms; variant {args.variant}; {total} samples of {len(cores) - 2} worker(s); "
          "load average "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(f"| process | CPU cores used under load (of {os.cpu_count()}) |\n|---|---:|")
    for name, used in cores.items():
        print(f"| {name} | {used:.2f} |")
    print(f"| all of them | {sum(cores.values()):.2f} |\n")
    logging_config = "TorchServe's stock log4j2.xml" if args.stock_logging else "configs/log4j2.xml"
    print(f"log lines written under load: {log_rate:.1f} MB/s ({logging_config})\n")
    print("| stage of the workers | share of samples |\n|---|---:|")
    for name, n in buckets.most_common():
        print(f"| {name} | {n / total:.0%} |")
    print(f"\ntop {args.top} functions by own samples:")
    for frame, n in leaves.most_common(args.top):
        print(f"  {n / total:5.1%}  {frame}")
    print(json.dumps({"buckets": dict(buckets), "cores": {k: round(v, 3) for k, v in cores.items()},
                      "log_mb_per_s": round(log_rate, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
