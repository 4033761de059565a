"""Fault injection against a live TorchServe: `make chaos`, `python -m bench.chaos`.

Archives the checkpoint into a temporary model store, starts the project's TorchServe
(serving/server.py) on free loopback ports and runs each scenario under load, then prints a
Markdown report. Every loop is bounded in time and stops by itself.

  inputs   a corpus of bad requests: status and message of each; the worker must survive them all
  kill     kill -9 a worker under steady load: every request's outcome, time to full throughput
  sigterm  SIGTERM the frontend under load: time until every process is gone, then a clean restart
           on the same run directory and ports
  soak     ~70% of measured capacity for --soak-seconds: errors, p50/p99 per minute, RSS start/end
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from bench.load import write_digits
from bench.record import write_record
from bench.report import other_jobs
from bench.scenarios import Harness, say, scenario_inputs, scenario_kill, scenario_sigterm, scenario_soak
from serving.archive import DEFAULT_VARIANT, build_archive
from serving.server import ServerError, TorchServe
from serving.worker.variants import serving_model, to_model_input
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

SCENARIOS = ("inputs", "kill", "sigterm", "soak")


def expected_digits(checkpoint: Path, images: torch.Tensor) -> list[int]:
    """What the served model answers, computed offline the way the worker runs it."""
    model = serving_model(model_from_checkpoint(load_checkpoint(checkpoint)), DEFAULT_VARIANT)
    with torch.inference_mode():
        return model(to_model_input(images)).argmax(1).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
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
                runs: dict[str, Callable[[Harness], list[str]]] = {
                    "inputs": scenario_inputs, "kill": scenario_kill, "sigterm": scenario_sigterm,
                    "soak": lambda h: scenario_soak(h, args.soak_seconds)}
                run = runs[name]
                report += ["", *run(h)]
        finally:
            h.server.stop()
    print(f"# Chaos report\n\n{os.cpu_count()} CPUs, 1-minute load average {load_before[0]:.1f} at the start "
          f"and {os.getloadavg()[0]:.1f} at the end; checkpoint {args.checkpoint}; torch {torch.__version__}; "
          f"`{' '.join(['python -m bench.chaos', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
          f"Other processes using CPU at the start: {jobs_before}; at the end: {other_jobs()}.")
    print("\n".join(report))
    write_record("chaos", {"report": "\n".join(report), "scenarios": scenarios, "other_jobs_at_start": jobs_before},
                 baseline={"note": "each scenario's rate before its fault, same run"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
