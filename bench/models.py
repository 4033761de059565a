"""Which model to serve: `make report-models` (`python -m bench.models`).

Trains (or reuses) the default config over seeds, the tuned config (configs/tuned.yaml) over
seeds, and scores ensembles of the first 3 and 5 default members (or, with `--member-config`,
of members trained with other configs, e.g. configs/ensemble-deep.yaml, or that one alternating with
configs/ensemble-deep3.yaml: `--member-config` twice); prints one Markdown table of
test accuracy mean ± std, training time per model and in-process serving throughput (images/s of
the model as a TorchServe worker runs it: fused variant, one thread, channels_last, batches of 32;
for throughput over HTTP, `make bench-serve ARGS="--ensemble artifacts/report/default/ensemble-5.pt"`).
Each run is an ordinary `fit`, so its metrics are the ones `make train` prints. Slow: one full
default training took about 2.5 min on 2 cores, so the full report trains 5 + 3 models.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.record import write_record
from serving.worker.variants import serving_model, to_model_input
from training import config as cfglib
from training.checkpoint import CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint
from training.core.ensemble import build_ensemble
from training.data import DataError, load_split
from training.data import data_dir as mnist_dir
from training.recipes.ensemble_train import combine, train_members
from training.train_config import DEFAULT_CONFIG, TrainConfig

DRY = {"epochs": 1, "train_limit": 500, "val_size": 500, "device": "cpu", "threads": 1, "batch_size": 32}


def throughput(model: torch.nn.Module, images: torch.Tensor, seconds: float = 2.0) -> float:
    """Images per second through `model` in batches of 32, one thread (best of 5 timed rounds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = to_model_input(images[:32])
    best = 0.0
    try:
        with torch.inference_mode():
            model(x)
            for _ in range(5):
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < seconds / 5:
                    model(x)
                    n += 32
                best = max(best, n / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return best


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2%} (n=1)"
    return f"{statistics.mean(values):.2%} ± {statistics.stdev(values):.2%} (n={len(values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the single-model rows (default 3)")
    parser.add_argument("--members", type=int, default=5, help="largest ensemble (default 5; 3 is also reported)")
    parser.add_argument("--tuned", type=Path, default=Path("configs/tuned.yaml"))
    parser.add_argument("--member-config", type=Path, action="append", default=None,
                        help="train the ensemble members with this config (default: the default members); "
                             "repeat it for members of several configs, member k taking config k mod their number")
    parser.add_argument("--out", type=Path, default=Path("artifacts/report"))
    parser.add_argument("--dry-run", action="store_true", help="tiny runs on a slice: checks the path, not the models")
    args = parser.parse_args(argv)
    data_dir = str(mnist_dir())  # $MNIST_DIR or data/
    try:
        configs = {}
        for label, path in (("default", DEFAULT_CONFIG), ("tuned", args.tuned)):
            cfg = cfglib.apply(cfglib.apply(TrainConfig(), cfglib.load_yaml(path)), {"data_dir": data_dir})
            configs[label] = cfglib.apply(cfg, DRY) if args.dry_run else cfg
        # The default members double as the ensemble's unless --member-config trains others.
        n_default = args.seeds if args.member_config is not None else max(args.seeds, args.members)
        default = train_members([configs["default"]], n_default, args.out / "default",
                                quiet=True, dry_run=args.dry_run)
        tuned = train_members([configs["tuned"]], args.seeds, args.out / "tuned", quiet=True, dry_run=args.dry_run)
        members, member_label = default, "default"
        if args.member_config is not None:
            bases = [cfglib.apply(TrainConfig(), {**cfglib.load_yaml(path), "data_dir": data_dir})
                     for path in args.member_config]
            member_label = "+".join(path.stem for path in args.member_config)
            members = train_members([cfglib.apply(cfg, DRY) if args.dry_run else cfg for cfg in bases], args.members,
                                    args.out / member_label, quiet=True, dry_run=args.dry_run)
    except (ValueError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    test_x, _ = load_split(data_dir, train=False)
    rows = []
    for label, paths in (("default", default[: args.seeds]), ("tuned", tuned)):
        ckpts = [load_checkpoint(p) for p in paths]
        model = serving_model(model_from_checkpoint(ckpts[0]), "fused")
        rows.append((f"{label} ({args.tuned if label == 'tuned' else DEFAULT_CONFIG.name})",
                     spread([c["metrics"]["test_accuracy"] for c in ckpts]),
                     statistics.mean(c["metrics"]["train_seconds"] for c in ckpts), throughput(model, test_x)))
    for n in sorted({min(3, args.members), args.members}):
        ensemble = combine(members[:n], data_dir)
        atomic_save(ensemble, args.out / member_label / f"ensemble-{n}.pt")
        ckpts = [load_checkpoint(p) for p in members[:n]]
        model = build_ensemble([serving_model(model_from_checkpoint(c), "fused") for c in ckpts],
                               ensemble["temperatures"], "grouped")
        seconds = sum(c["metrics"]["train_seconds"] for c in ckpts)
        rows.append((f"ensemble of {n} ({member_label}, seeds 0-{n - 1})",
                     spread([ensemble["metrics"]["test_accuracy"]]), seconds, throughput(model, test_x)))
    print(f"\n{torch.get_num_threads()} threads for training, torch {torch.__version__}"
          + (" — DRY RUN: tiny slices, the numbers say nothing about the models" if args.dry_run else "") + "\n")
    print("| model | test accuracy | training s (per model; ensembles: sum) | worker img/s (1 thread, batch 32) |")
    print("|---|---:|---:|---:|")
    for label, accuracy, seconds, ips in rows:
        print(f"| {label} | {accuracy} | {seconds:,.0f} | {ips:,.0f} |")
    if not args.dry_run:  # a dry run measures nothing: no record
        table = [{"model": label, "test accuracy": accuracy,
                  "training s (per model; ensembles: sum)": f"{seconds:,.0f}",
                  "worker img/s (1 thread, batch 32)": f"{ips:,.0f}", "img/s vs default": f"{ips / rows[0][3]:.3f}x"}
                 for label, accuracy, seconds, ips in rows]
        print(f"record: {write_record('report-models', {'tables': {'models': table}}, baseline=table[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
