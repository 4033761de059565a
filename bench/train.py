"""Training benchmark: time-to-accuracy over several seeds, `make bench-train` (`python -m bench.train`).

Each run is a separate `python -m training.train --test-every-epoch` process (clean timings and peak
memory), so the seconds reported are the trainer's own: training epochs only, data loading and
per-epoch evaluation excluded. First, in the same run, the plain recipe (bench/plain.py) trains for
`--baseline-epochs` and its mean seconds per epoch becomes the unit: each time-to-accuracy is also given
in baseline epochs ("bl-ep"), which holds across machines where seconds do not. Prints a Markdown table
under the CPU's name; writes artifacts/bench/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.record import markdown_tables, write_record
from bench.report import machine_line

THRESHOLDS = (0.99, 0.994, 0.995)
# The goal each config is checked against: this mean test accuracy over the seeds, with the mean training
# time at most this many baseline epochs.
GOAL_ACCURACY, GOAL_BL_EP = 0.995, 2.0
# The shipped config, and the same in fp32: on a CPU with native bf16 the default trains in bf16, so the
# second row is what a CPU without it gets (the goals must hold on both).
DEFAULT_CONFIGS = ["default=", "fp32-only=--amp false"]


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
            "device": metrics["device"], "epochs": metrics["epochs"], "precision": metrics.get("precision", ""),
            **{f"seconds_to_{t:.3f}": s for t, s in reached.items()}}


def _mean_sd(values: list[float | None], fmt: str) -> str:
    hit = [v for v in values if v is not None]
    if len(hit) < len(values):
        return f"{len(hit)}/{len(values)} runs" + (f", {fmt.format(statistics.mean(hit))}" if hit else "")
    sd = statistics.stdev(hit) if len(hit) > 1 else 0.0
    return f"{fmt.format(statistics.mean(hit))} ± {fmt.format(sd)}"


def _peak(values: list[float | None]) -> str:
    """The largest of the runs' peaks; a dash where there was no GPU."""
    known = [v for v in values if v is not None]
    return f"{max(known):,.0f}" if known else "—"


def _reach(values: list[float | None], unit: float | None) -> str:
    """Seconds to a threshold over the runs, and the mean in baseline epochs beside it."""
    cell = _mean_sd(values, "{:.0f}")
    hit = [v for v in values if v is not None]
    return f"{cell} ({statistics.mean(hit) / unit:.1f} bl-ep)" if hit and unit else cell


def baseline(epochs: int, limit: int) -> dict:
    """The plain recipe in its own process (bench/plain.py): seconds per epoch and accuracy after each."""
    cmd = [sys.executable, "-m", "bench.plain", "--epochs", str(epochs), "--train-limit", str(limit)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    history = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"epochs": history, "seconds_per_epoch": statistics.mean(h["seconds"] for h in history)}


def table(results: dict[str, list[dict]], base: dict | None = None) -> str:
    unit = base["seconds_per_epoch"] if base else None
    lines = ["| config | device | precision | runs | test accuracy (%) | s to 99.0% | s to 99.4% | s to 99.5% "
             "| s total | img/s | peak RSS MB | peak CUDA MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        h = base["epochs"]
        lines.append(f"| plain recipe (baseline) | cpu | fp32 | 1 | {100 * h[-1]['test_accuracy']:.2f} after "
                     f"{len(h)} epoch(s) | | | | {unit:.0f} per epoch (= 1 bl-ep) "
                     f"| {h[0]['images'] / unit:,.0f} | | — |")
    for name, runs in results.items():
        cols = {k: [r[k] for r in runs] for k in runs[0]}
        accuracy = _mean_sd([100 * a for a in cols["test_accuracy"]], "{:.2f}")
        lines.append(
            f"| {name} | {runs[0]['device']} | {runs[0].get('precision', '')} | {len(runs)} | {accuracy} "
            f"| {_reach(cols['seconds_to_0.990'], unit)} | {_reach(cols['seconds_to_0.994'], unit)} "
            f"| {_reach(cols['seconds_to_0.995'], unit)} "
            f"| {_reach(cols['train_seconds'], unit)} | {statistics.mean(cols['images_per_second']):,.0f} "
            f"| {max(cols['peak_rss_mb']):,.0f} | {_peak(cols['peak_cuda_mb'])} |")
    return "\n".join(lines)


def goals(results: dict[str, list[dict]], base: dict | None) -> list[dict]:
    """Each config against the goal: mean test accuracy >= 99.5% and mean training time <= 2 baseline epochs."""
    rows = []
    for name, runs in results.items():
        accuracy = statistics.mean(r["test_accuracy"] for r in runs)
        bl_ep = statistics.mean(r["train_seconds"] for r in runs) / base["seconds_per_epoch"] if base else None
        met = accuracy >= GOAL_ACCURACY and bl_ep is not None and bl_ep <= GOAL_BL_EP
        rows.append({"config": name, "seeds": len(runs), "mean test accuracy": f"{100 * accuracy:.2f}%",
                     "mean training time": f"{bl_ep:.2f} bl-ep" if bl_ep is not None else "no baseline",
                     "goal": f"{100 * GOAL_ACCURACY:.1f}% in <= {GOAL_BL_EP:g} bl-ep",
                     "verdict": "met" if met else "not met"})
    return rows


def goal_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] if rows else []
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", action="append", metavar="NAME=FLAGS",
                        help="a named set of training flags, repeatable, e.g. 'no-aug=--augment false' "
                             "(default: the shipped config, and the same with --amp false)")
    parser.add_argument("--out", default="artifacts/bench", type=Path)
    parser.add_argument("--baseline-epochs", type=int, default=1, help="epochs of the plain recipe (0: no baseline)")
    parser.add_argument("--baseline-limit", type=int, default=0, help="plain recipe on the first N images (tests)")
    args = parser.parse_args(argv)
    configs = dict(c.split("=", 1) for c in (args.config or DEFAULT_CONFIGS))
    results: dict[str, list[dict]] = {}
    machine = machine_line()
    print(machine, flush=True)
    base = baseline(args.baseline_epochs, args.baseline_limit) if args.baseline_epochs else None
    if base:
        print(f"  plain recipe: {base['seconds_per_epoch']:.0f}s per epoch, "
              f"test {base['epochs'][-1]['test_accuracy']:.2%}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mnist-train-bench-") as tmp:
        for name, flags in configs.items():
            for seed in range(args.seeds):
                run = run_once(shlex.split(flags), seed, Path(tmp) / f"{name}-{seed}")
                results.setdefault(name, []).append(run)
                print(f"  {name} seed {seed}: test {run['test_accuracy']:.2%} in {run['train_seconds']:.0f}s, "
                      f"99.4% at {run['seconds_to_0.994']}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps({"machine": machine, "baseline": base, "runs": results},
                                                       indent=2) + "\n")
    print(f"\n{machine}\nat the end: load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(table(results, base))
    verdicts = goal_table(goals(results, base))
    print(f"\n{verdicts}")
    record = write_record("bench-train", {"tables": {"time to accuracy": markdown_tables(table(results, base))[0],
                                                     "goal": markdown_tables(verdicts)[0]},
                                          "runs": results}, baseline=base)
    print(f"\nwrote {args.out}/training.json and {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
