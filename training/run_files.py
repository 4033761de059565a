"""What a training run writes and reads back: last.pt (resume), metrics, history, plots and the checkpoint.

`fit` (training/loop.py) calls these; a resumed run checks its flags against the config saved in last.pt.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training import config as cfglib
from training.checkpoint import atomic_save, make_checkpoint, publish
from training.core import precision
from training.core.model import Net
from training.distributed import Dist
from training.metrics import plot_confusion, plot_curves
from training.splits import Splits
from training.train_config import TrainConfig, saved_base
from training.trust import fit_trust


def save_last(path: Path, model: Net, opt, sched, state: dict[str, Any]) -> None:
    # No RNG state: every epoch reseeds its draws (derived_seed), so this file resumes on any device.
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "schedule": sched.state_dict() if sched is not None else None, **state}, path)


# Test-only hook: with MNIST_TEST_HOLD_AFTER_EPOCH=N a run waits right after last.pt of epoch N is written,
# until a signal, `stop()`, the file named by MNIST_TEST_RELEASE_FILE, or 10 minutes: tests
# (test_faults.py, test_tune.py) interrupt or overlap runs at a known point instead of racing the
# machine's speed. The run creates the file named by MNIST_TEST_HOLDING_FILE once it waits: a SIGINT sent
# then lands in the wait, not in the clean-up after last.pt (where a finaliser may swallow it). Unset in
# every normal run.
HOLD_ENV = "MNIST_TEST_HOLD_AFTER_EPOCH"


RELEASE_ENV = "MNIST_TEST_RELEASE_FILE"


HOLDING_ENV = "MNIST_TEST_HOLDING_FILE"


def hold_for_test(epoch: int, stop: Callable[[], bool] | None) -> None:
    if os.environ.get(HOLD_ENV) != str(epoch):
        return
    release = Path(os.environ.get(RELEASE_ENV) or "/nonexistent/release")
    if holding := os.environ.get(HOLDING_ENV):
        Path(holding).touch()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not release.exists() and not (stop is not None and stop()):
        time.sleep(0.05)


# What --resume lets the command line change: where the run reads and writes, and what it runs on.
# Any other flag would make the resumed run a different run than the one saved.
RESUME_MAY_CHANGE = ("data_dir", "out_dir", "device", "threads")


def resume_config(last: Path, saved: dict[str, Any], cfg: TrainConfig, flags: dict[str, Any]) -> TrainConfig:
    """The config saved in last.pt, with the directories of `cfg`; `flags` (given on the command line,
    dotted name → value) may also change the device and thread count, and must agree on the rest."""
    resumed = cfglib.apply(saved_base(), {**saved, "out_dir": cfg.out_dir, "data_dir": cfg.data_dir})
    mine, theirs = cfglib.to_dict(cfg), cfglib.to_dict(resumed)

    def value(config: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            config = config[part]
        return config

    changed = {k: (value(mine, k), value(theirs, k)) for k in flags if value(mine, k) != value(theirs, k)}
    refused = [f"--{k.replace('_', '-')} {new} (saved: {old})" for k, (new, old) in changed.items()
               if k not in RESUME_MAY_CHANGE]
    if refused:
        raise cfglib.ConfigError(f"--resume continues the run saved in {last} with its own config; "
                                 f"{', '.join(refused)} would change it: drop the flag, or start a new run "
                                 "without --resume")
    return cfglib.apply(resumed, {k: new for k, (new, _) in changed.items()})


def run_metrics(cfg: TrainConfig, dd: Dist, device: torch.device, state: dict, test: dict,
             sets: dict[str, dict]) -> dict[str, Any]:
    history = state["history"]
    best = max(history, key=lambda h: h["val_accuracy"])
    seconds = history[-1]["train_seconds"]
    images = sum(h["images_per_second"] * h["seconds"] for h in history)
    return {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"], "best_epoch": best["epoch"],
        "epochs": len(history), "train_seconds": seconds, "images_per_second": round(images / seconds, 1),
        "device": str(device), "world_size": dd.world, "global_batch_size": cfg.batch_size * dd.world,
        "seed": cfg.seed, "precision": precision.describe(device, cfg.amp), **peak_memory_mb(device), **sets,
        "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec,
    so a child of a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """The process's peak resident memory, and on CUDA the peak memory its tensors took on the GPU."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "peak_cuda_mb": None if cuda is None else round(cuda, 1)}


def write_outputs(out: Path, model: Net, cfg: TrainConfig, metrics: dict, state: dict, opt, sched,
                   force: bool, log, data: Splits) -> dict[str, Any]:
    # Temperature and "not a digit" threshold: fitted on the validation split, for the chosen epoch.
    with tempfile.TemporaryDirectory(dir=out, prefix=".plots-") as plots:  # reliability.png, until named
        trust, trust_metrics = fit_trust(model, (data.train_x, data.train_y), (data.val_x, data.val_y),
                                         (data.test_x, data.test_y), Path(plots))
        metrics = {**metrics, **trust_metrics}
        ckpt = make_checkpoint(model, cfglib.to_dict(cfg),
                               {k: v for k, v in metrics.items() if k != "confusion_matrix"})
        ckpt.update(trust)
        metrics = {**metrics, "provenance": ckpt["provenance"], "config": ckpt["train_config"]}
        published = publish(ckpt, out, force=force)
        # A run that lost to the model.pt already there is model.candidate.pt: its records go beside it
        # (metrics.candidate.json, ...), and model.pt's own metrics, history and plots stay as they were.
        tag = ".candidate" if published.candidate else ""
        os.replace(Path(plots) / "reliability.png", out / f"reliability{tag}.png")
    (out / f"metrics{tag}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / f"history{tag}.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state["history"]))
    plot_confusion(metrics["confusion_matrix"], out / f"confusion_matrix{tag}.png")
    plot_curves(state["history"], out / f"curves{tag}.png")
    save_last(out / "last.pt", model, opt, sched, {**state, "config": cfglib.to_dict(cfg),
                                                    "world_size": metrics["world_size"], "finished": True})
    log(f"test accuracy {metrics['test_accuracy']:.2%} (best epoch {metrics['best_epoch']}, "
        f"val {metrics['val_accuracy']:.2%}) in {metrics['train_seconds']:.1f}s of training, "
        f"{metrics['images_per_second']:,.0f} img/s on {metrics['device']}")
    log(published)
    log(f"calibration: temperature {trust['temperature']:.3f}, test ECE {metrics['test_ece_before']:.2%} → "
        f"{metrics['test_ece_after']:.2%}; not-a-digit threshold rejects {metrics['ood_test_false_rejection']:.2%} "
        "of test digits")
    log(f"metrics, history and plots in {out}/" + (f" as *{tag}.* (this run's)" if tag else ""))
    return metrics
