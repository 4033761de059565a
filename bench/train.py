"""Training benchmark: time-to-accuracy over several seeds, `make bench-train` (`python -m bench.train`).

Each run is a separate `python -m training.train --test-every-epoch` process (clean timings and peak
memory), so the seconds reported are the trainer's own: training epochs only, data loading and
per-epoch evaluation excluded. Prints a Markdown table; writes artifacts/bench/training.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

THRESHOLDS = (0.99, 0.994)


def run_once(flags: list[str], seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "training.train", "--quiet", "--test-every-epoch", "--seed", str(seed),
           "--out-dir", str(out), *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    reached = {t: next((h["train_seconds"] for h in history if h["test_accuracy"] >= t), None) for t in THRESHOLDS}
    return {"seed": seed, "test_accuracy": metrics["test_accuracy"], "train_seconds": metrics["train_seconds"],
            "images_per_second": metrics["images_per_second"], "peak_rss_mb": metrics["peak_rss_mb"],
            "peak_cuda_mb": metrics["peak_cuda_mb"],
            "device": metrics["device"], "epochs": metrics["epochs"],
            **{f"seconds_to_{t:.3f}": s for t, s in reached.items()}}


def _mean_sd(values: list[float | None], fmt: str) -> str:
    if any(v is None for v in values):
        hit = [v for v in values if v is not None]
        return f"{len(hit)}/{len(values)} runs" + (f", {fmt.format(statistics.mean(hit))}" if hit else "")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def _peak(values: list[float | None]) -> str:
    """The largest of the runs' peaks; a dash where there was no GPU."""
    known = [v for v in values if v is not None]
    return f"{max(known):,.0f}" if known else "—"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| config | device | runs | test accuracy (%) | s to 99.0% | s to 99.4% | s total | img/s "
             "| peak RSS MB | peak CUDA MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        cols = {k: [r[k] for r in runs] for k in runs[0]}
        accuracy = _mean_sd([100 * a for a in cols["test_accuracy"]], "{:.2f}")
        lines.append(
            f"| {name} | {runs[0]['device']} | {len(runs)} | {accuracy} "
            f"| {_mean_sd(cols['seconds_to_0.990'], '{:.0f}')} | {_mean_sd(cols['seconds_to_0.994'], '{:.0f}')} "
            f"| {_mean_sd(cols['train_seconds'], '{:.0f}')} | {statistics.mean(cols['images_per_second']):,.0f} "
            f"| {max(cols['peak_rss_mb']):,.0f} | {_peak(cols['peak_cuda_mb'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", action="append", metavar="NAME=FLAGS",
                        help="a named set of training flags, repeatable, e.g. 'no-aug=--augment false' "
                             "(default: the shipped config alone)")
    parser.add_argument("--out", default="artifacts/bench", type=Path)
    args = parser.parse_args(argv)
    configs = dict(c.split("=", 1) for c in (args.config or ["default="]))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mnist-train-bench-") as tmp:
        for name, flags in configs.items():
            for seed in range(args.seeds):
                run = run_once(shlex.split(flags), seed, Path(tmp) / f"{name}-{seed}")
                results.setdefault(name, []).append(run)
                print(f"  {name} seed {seed}: test {run['test_accuracy']:.2%} in {run['train_seconds']:.0f}s, "
                      f"99.4% at {run['seconds_to_0.994']}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {args.out}/training.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
