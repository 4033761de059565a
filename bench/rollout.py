"""Zero-downtime proof: deploy, promote and roll back a version while 32 clients keep sending digits.

`make rollout-check` (`python -m bench.rollout`): a TorchServe of its own on free loopback ports
(model API on, archives signed with a throwaway key), version OLD serving, then under constant load
at c=32 (bench/load.py's keep-alive clients on `/predictions/mnist`):

    warm-up     OLD alone, the first seconds of load
    steady      OLD alone
    deploy      NEW registered beside it (its worker loads while OLD answers)
    promote     NEW becomes the default
    rollback    OLD is the default again
    undeploy    NEW unregistered

Each step reports its requests, failures, p99 latency and which versions answered (X-Model-Version).
The check fails if any request failed or an answer came from a version other than OLD or NEW.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2

from bench.load import Load, Record, p99_ms
from bench.record import markdown_tables, write_record
from serving import lifecycle
from serving.archive import build_archive
from serving.server import TorchServe
from training.data import load_split

# warm-up: the first seconds of load (new connections, the JVM's JIT) are slow on any server; reported,
# not hidden, but kept apart from "steady", the baseline the other steps compare with.
STEPS = ("warm-up", "steady", "deploy", "promote", "rollback", "undeploy")


@dataclass
class Step:
    name: str
    action_seconds: float  # how long the management call took (the load ran throughout)
    records: list[Record]

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.status != 200]

    @property
    def versions(self) -> Counter:
        return Counter(r.version for r in self.records if r.status == 200)

    def p99_ms(self) -> float:
        return p99_ms(self.records) or 0.0


def digits(count: int, data_dir: str | None) -> tuple[list[bytes], list[int]]:
    images, labels = load_split(data_dir, train=False)
    return [cv2.imencode(".png", images[i].numpy())[1].tobytes() for i in range(count)], labels[:count].tolist()


def run_steps(server: TorchServe, old: str, new: str, step_seconds: float, threads: int,
              pngs: list[bytes], labels: list[int]) -> list[Step]:
    """The steps under one continuous load; each step lasts `step_seconds` after its action returns."""
    actions = {
        "warm-up": lambda: None,
        "steady": lambda: None,
        "deploy": lambda: lifecycle.deploy(server, server.model_store, new),
        "promote": lambda: lifecycle.promote(server, new),
        "rollback": lambda: lifecycle.rollback(server),
        "undeploy": lambda: lifecycle.undeploy(server, new),
    }
    load = Load(server, pngs, labels, threads, max_seconds=len(STEPS) * (step_seconds + 120), timeout=15).start()
    bounds = []
    try:
        for name in STEPS:
            start = load.now()
            actions[name]()
            acted = load.now()
            time.sleep(step_seconds)
            bounds.append((name, start, acted - start, load.now()))
    finally:
        records = load.stop()
    return [Step(name, action, [r for r in records if start <= r.start < end]) for name, start, action, end in bounds]


def serve_old_beside_new(checkpoint: Path, candidate: Path, work: Path, old: str = "1.0",
                         new: str = "2.0") -> TorchServe:
    """A started server of its own in `work`, model API on, serving OLD; NEW archived in its store, not
    registered. Archives are signed with a key made in `work` (never the user's)."""
    os.environ["MNIST_SERVE_KEY_DIR"] = str(work / "keys")
    os.environ.pop("MNIST_SERVE_TRUSTED_DIR", None)
    store = work / "store"
    build_archive(checkpoint, store, "mnist", old)
    server = TorchServe.on_free_ports(work / "run", store, extra_properties={"enable_model_api": "true"})
    server.start()
    try:
        build_archive(candidate, store, "mnist", new)  # keeps OLD as mnist-OLD.mar, as `make archive` does
    except BaseException:
        server.stop()
        raise
    return server


def rollout(checkpoint: Path, candidate: Path, work: Path, step_seconds: float, threads: int = 32,
            data_dir: str | None = None, old: str = "1.0", new: str = "2.0") -> list[Step]:
    server = serve_old_beside_new(checkpoint, candidate, work, old, new)
    try:
        pngs, labels = digits(500, data_dir)
        return run_steps(server, old, new, step_seconds, threads, pngs, labels)
    finally:
        server.stop()


def table(steps: list[Step]) -> list[str]:
    lines = ["| step | management call s | requests | failed | p99 ms | answered by |", "|---|---|---|---|---|---|"]
    for s in steps:
        by = ", ".join(f"{v}: {n}" for v, n in sorted(s.versions.items()))
        lines.append(f"| {s.name} | {s.action_seconds:.2f} | {len(s.records)} | {len(s.failures)} | "
                     f"{s.p99_ms():.0f} | {by} |")
    return lines


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path, help="served as version 1.0")
    parser.add_argument("--candidate", type=Path, help="rolled out as version 2.0 (default: --checkpoint)")
    parser.add_argument("--step-seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dry-run", action="store_true", help="2 s per step")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mnist-rollout-") as tmp:
        steps = rollout(args.checkpoint, args.candidate or args.checkpoint, Path(tmp),
                        2 if args.dry_run else args.step_seconds, args.threads, args.data_dir)
    print(f"{cpu_name()}; c={args.threads}; each step lasts {args.step_seconds if not args.dry_run else 2} s "
          "after its management call returns")
    print("\n".join(table(steps)))
    failed = [r for s in steps for r in s.failures]
    foreign = {v for s in steps for v in s.versions} - {"1.0", "2.0"}
    for r in failed[:5]:
        print(f"failed at {r.start:.2f}s: {r.status} {r.detail}", file=sys.stderr)
    if foreign:
        print(f"answers from unexpected versions: {sorted(foreign)}", file=sys.stderr)
    if not args.dry_run:  # a dry run measures nothing: no record
        write_record("rollout-check", {"tables": {"steps": markdown_tables("\n".join(table(steps)))[0]},
                                       "clients": args.threads, "step_seconds": args.step_seconds},
                     baseline={"step": "steady (1.0 alone, same run)"})
    return 1 if failed or foreign else 0


if __name__ == "__main__":
    sys.exit(main())
