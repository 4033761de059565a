"""Train the MNIST CNN: `make train`, `python -m training.train`, or `torchrun ... -m training.train`.

The whole dataset lives on the device as uint8 tensors; batches are gathered by index and augmented
there, so there is no DataLoader and no worker process. Under torchrun each rank takes a disjoint
shard of every epoch and the metrics are summed over ranks; rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training import config as cfglib
from training.checkpoint import CheckpointError, atomic_save, make_checkpoint, publish, read_checkpoint_file
from training.data import DataError, load_split
from training.distributed import Dist, cleanup, setup_distributed, sync_buffers
from training.evaluate import confusion, plot_confusion, plot_curves, summarize
from training.model import ModelConfig, Net
from training.preprocess import MNIST_MEAN, MNIST_STD, normalize
from training.regularization import l1_penalty
from training.schedules import warm_restarts
from training.tensorboard import RunLog, default_run_name

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train.yaml"


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = "data"
    out_dir: str = "artifacts"
    device: str = "auto"  # auto | cuda | mps | cpu
    seed: int = 0
    epochs: int = 8
    batch_size: int = 128  # per process; under torchrun the global batch is this × world size
    optimizer: str = "nesterov"  # sgd | nesterov | adam | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | cosine_restarts | plateau | none
    restart_period: int = 2  # cosine_restarts: epochs in the first cycle (training/schedules.py)
    restart_mult: int = 2  # cosine_restarts: each cycle this many times longer than the one before
    l1: float = 0.0  # L1 penalty on conv/linear weights (training/regularization.py); 0 disables
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    label_smoothing: float = 0.1
    augment: bool = True
    rotate: float = 10.0  # degrees
    shift: float = 0.1  # fraction of the image side
    scale: float = 0.1  # ± relative zoom
    val_size: int = 5000
    early_stop: int = 0  # stop after this many epochs without a better validation accuracy; 0 disables
    train_limit: int = 0  # use only this many training images (0: all); for quick runs and tests
    test_limit: int = 0
    threads: int = 0  # CPU intra-op threads; 0: all cores (divided between local ranks)
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (pays a one-off compile time)
    tensorboard: bool = True  # curves and misclassified digits in <out_dir>/runs/ (rank 0; `make tensorboard`)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        choices = {"device": ("auto", "cuda", "mps", "cpu"), "optimizer": ("sgd", "nesterov", "adam", "adamw"),
                   "schedule": ("onecycle", "cosine", "cosine_restarts", "plateau", "none")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise cfglib.ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise cfglib.ConfigError("epochs, batch_size and lr must be positive")
        if self.val_size < 0 or self.train_limit < 0 or self.test_limit < 0:
            raise cfglib.ConfigError("val_size, train_limit and test_limit must be >= 0")
        if self.l1 < 0 or self.restart_period < 1 or self.restart_mult < 1:
            raise cfglib.ConfigError("l1 must be >= 0, restart_period and restart_mult >= 1")


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise cfglib.ConfigError("device cuda was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def random_affine(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Small random rotation, zoom and shift of a normalised batch, on its device, in one grid_sample."""
    n = x.shape[0]
    rand = torch.rand(n, 4, device=x.device, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = rand[:, 0] * math.radians(cfg.rotate)
    zoom = 1 + rand[:, 1] * cfg.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, rand[:, 2] * 2 * cfg.shift], 1),
                         torch.stack([sin, cos, rand[:, 3] * 2 * cfg.shift], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0; shifting by the background value makes the padding black paper.
    background = -MNIST_MEAN / MNIST_STD
    return F.grid_sample(x - background, grid, align_corners=False) + background


def build_optimizer(model: Net, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.optimizer == "nesterov", weight_decay=cfg.weight_decay)
    opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine_restarts":
        return warm_restarts(opt, cfg.restart_period * steps_per_epoch, cfg.restart_mult)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
    return None


@dataclass
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data(cfg: TrainConfig, device: torch.device, test: bool = True) -> Splits:
    """The seeded train/validation split of MNIST's 60k, plus the 10k test set, all on `device`.

    test=False (hyperparameter search) never reads the test split: its tensors are empty.
    """
    images, labels = load_split(cfg.data_dir, train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_limit:
        train_idx = train_idx[: cfg.train_limit]
    if test:
        test_x, test_y = load_split(cfg.data_dir, train=False)
    else:
        test_x, test_y = images[:0], labels[:0]
    if cfg.test_limit:
        test_x, test_y = test_x[: cfg.test_limit], test_y[: cfg.test_limit]
    return Splits(*(t.to(device) for t in (images[train_idx], labels[train_idx], images[val_idx],
                                           labels[val_idx], test_x, test_y)))


def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dd: Dist) -> dict[str, Any]:
    """Metrics over the whole split: each rank scores its shard and the confusion matrices are summed."""
    matrix, loss = confusion(model, x[dd.rank :: dd.world], y[dd.rank :: dd.world])
    if dd.world > 1:
        dist.all_reduce(matrix)
        dist.all_reduce(loss)
    return summarize(matrix, loss.item())


class Progress:
    """A tqdm bar per epoch on a terminal; one summary line per epoch otherwise."""

    def __init__(self, enabled: bool, total: int, epoch: int, epochs: int) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="img", leave=False)

    def update(self, n: int, **stats: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(stats, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_epoch(model, opt, sched, data: Splits, cfg: TrainConfig, dd: Dist, epoch: int,
                gen: torch.Generator, show: bool, dry_run: bool) -> dict[str, float]:
    model.train()
    device = data.train_x.device
    # Every rank draws the same permutation (same seed, same epoch) and takes a disjoint slice.
    perm = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    perm = perm[dd.rank :: dd.world].to(device)
    steps = len(perm) // cfg.batch_size or 1
    if dry_run:
        steps = min(steps, 3)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bar = Progress(show, steps * cfg.batch_size, epoch, cfg.epochs)
    start = time.perf_counter()
    for step in range(steps):
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x, y = normalize(data.train_x[idx]), data.train_y[idx]
        if cfg.augment:
            x = random_affine(x, cfg, gen)
        x = x.contiguous(memory_format=memory_format)
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if cfg.l1:
                loss = loss + cfg.l1 * l1_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if sched is not None and cfg.schedule != "plateau":
            sched.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
        if bar.bar is not None and step % 20 == 0:
            seen = sums[2].item()
            bar.update(20 * cfg.batch_size if step else cfg.batch_size, loss=f"{sums[0].item() / seen:.3f}",
                       acc=f"{sums[1].item() / seen:.2%}", ips=f"{seen * dd.world / (time.perf_counter() - start):.0f}")
    bar.close()
    if dd.world > 1:
        dist.all_reduce(sums)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, correct, count = sums.tolist()
    return {"train_loss": loss_sum / count, "train_accuracy": correct / count,
            "seconds": seconds, "images_per_second": count / seconds}


def _save_last(path: Path, model: Net, opt, sched, gen: torch.Generator, state: dict[str, Any]) -> None:
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "schedule": sched.state_dict() if sched is not None else None,
                 "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), **state}, path)


def fit(cfg: TrainConfig, resume: bool = False, dry_run: bool = False, quiet: bool = False,
        force: bool = False, test_every_epoch: bool = False, on_epoch: Callable[[dict], None] | None = None,
        score_test: bool = True, run_name: str | None = None) -> dict[str, Any]:
    """Train, keep the best epoch by validation accuracy, score it on the test set, write artifacts.

    Returns the metrics written to metrics.json (on every rank). `on_epoch(row)` sees each epoch's
    history row (training/tune.py reports it to Optuna and may raise to stop the run);
    score_test=False never loads the test split and returns validation metrics without publishing.
    """
    out = Path(cfg.out_dir)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_state": None, "best_val": -1.0, "stale": 0}
    if resume:
        last = out / "last.pt"
        saved = read_checkpoint_file(last, f"nothing to resume: {last} does not exist",
                                     advice="start the run again without --resume")
        cfg = cfglib.apply(TrainConfig(), {**saved["config"], "out_dir": cfg.out_dir, "data_dir": cfg.data_dir})
        if saved["epoch"] >= cfg.epochs or saved.get("finished"):
            raise CheckpointError(f"{out / 'last.pt'} is from a finished run: nothing to resume")
        state.update({k: saved[k] for k in state})

    if test_every_epoch and not score_test:
        raise cfglib.ConfigError("test_every_epoch needs the test set, which score_test=False never loads")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    dd = setup_distributed(device.type == "cuda")
    say = print if dd.is_main else (lambda *a, **k: None)  # results: rank 0 only
    log = say if not quiet else (lambda *a, **k: None)  # progress: also silenced by --quiet
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dd.local_world))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dd.rank)  # augmentation draws
    board = RunLog(None)

    try:
        data = load_data(cfg, device, test=score_test)
        board = RunLog(out / "runs" / (run_name or default_run_name(cfg.seed))
                       if cfg.tensorboard and dd.is_main else None)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = Net(cfg.model).to(device, memory_format=memory_format)
        steps_per_epoch = max(1, len(data.train_x) // dd.world // cfg.batch_size)
        opt = build_optimizer(model, cfg)
        sched = build_schedule(opt, cfg, steps_per_epoch)
        if resume:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved["schedule"])
            gen.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])  # dropout draws from the global generator
            log(f"resuming {out / 'last.pt'} after epoch {state['epoch']}/{cfg.epochs}")
        net = model
        if dd.world > 1:
            device_ids = [local_rank] if device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.compile:
            net = torch.compile(net)
        log(f"training on {len(data.train_x):,} images ({len(data.val_x):,} validation, {len(data.test_x):,} test) "
            f"on {device}" + (f" × {dd.world} ranks" if dd.world > 1 else "")
            + f"; global batch {cfg.batch_size * dd.world}, peak lr {cfg.lr}, {cfg.optimizer}, {cfg.schedule}")
        if dd.is_main:
            out.mkdir(parents=True, exist_ok=True)

        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            stats = train_epoch(net, opt, sched, data, cfg, dd, epoch, gen, show=not quiet and dd.is_main,
                                dry_run=dry_run)
            sync_buffers(model, dd)
            val = score(model, data.val_x, data.val_y, dd) if len(data.val_x) else \
                {"accuracy": stats["train_accuracy"], "loss": stats["train_loss"]}
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(val["accuracy"])
            previous = state["history"][-1]["train_seconds"] if state["history"] else 0.0
            row = {"epoch": epoch, **{k: round(v, 6) for k, v in stats.items()},
                   "val_loss": round(val["loss"], 6), "val_accuracy": val["accuracy"],
                   "lr": opt.param_groups[0]["lr"], "train_seconds": round(previous + stats["seconds"], 3)}
            if test_every_epoch:
                row["test_accuracy"] = score(model, data.test_x, data.test_y, dd)["accuracy"]
            state["history"].append(row)
            board.epoch(row, model, data.val_x, data.val_y)
            improved = val["accuracy"] > state["best_val"]
            if improved:
                state["best_val"], state["stale"] = val["accuracy"], 0
                state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                state["stale"] += 1
            state["epoch"] = epoch
            log(f"epoch {epoch}/{cfg.epochs}  loss {stats['train_loss']:.4f}  train {stats['train_accuracy']:.2%}  "
                f"val {val['accuracy']:.2%}{' *' if improved else '  '}  lr {row['lr']:.4f}  "
                f"{stats['seconds']:.1f}s  {stats['images_per_second']:,.0f} img/s"
                + (f"  test {row['test_accuracy']:.2%}" if test_every_epoch else ""))
            if dd.is_main:
                _save_last(out / "last.pt", model, opt, sched, gen, {**state, "config": cfglib.to_dict(cfg)})
            if on_epoch is not None:
                on_epoch(row)
            if cfg.early_stop and state["stale"] >= cfg.early_stop:
                log(f"early stop: no better validation accuracy for {cfg.early_stop} epochs")
                break

        model.load_state_dict(state["best_state"])
        if not score_test:
            best = max(state["history"], key=lambda h: h["val_accuracy"])
            return {"val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
                    "epochs": len(state["history"]), "train_seconds": state["history"][-1]["train_seconds"]}
        test = score(model, data.test_x, data.test_y, dd)
        board.test(model, data.test_x, data.test_y, test["accuracy"], state["epoch"])
        metrics = _metrics(cfg, dd, device, state, test)
        if dd.is_main:
            _write_outputs(out, model, cfg, metrics, state, opt, sched, gen, force, say)
        return metrics
    finally:
        board.close()  # also for a pruned or interrupted run: the curves so far are flushed
        cleanup(dd)


def _metrics(cfg: TrainConfig, dd: Dist, device: torch.device, state: dict, test: dict) -> dict[str, Any]:
    history = state["history"]
    best = max(history, key=lambda h: h["val_accuracy"])
    seconds = history[-1]["train_seconds"]
    images = sum(h["images_per_second"] * h["seconds"] for h in history)
    return {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"], "best_epoch": best["epoch"],
        "epochs": len(history), "train_seconds": seconds, "images_per_second": round(images / seconds, 1),
        "device": str(device), "world_size": dd.world, "global_batch_size": cfg.batch_size * dd.world,
        "seed": cfg.seed, "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
    }


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_outputs(out: Path, model: Net, cfg: TrainConfig, metrics: dict, state: dict, opt, sched, gen,
                   force: bool, log) -> None:
    ckpt = make_checkpoint(model, cfglib.to_dict(cfg), {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    metrics = {**metrics, "provenance": ckpt["provenance"], "config": ckpt["train_config"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state["history"]))
    plot_confusion(metrics["confusion_matrix"], out / "confusion_matrix.png")
    plot_curves(state["history"], out / "curves.png")
    _save_last(out / "last.pt", model, opt, sched, gen, {**state, "config": cfglib.to_dict(cfg), "finished": True})
    log(f"test accuracy {metrics['test_accuracy']:.2%} (best epoch {metrics['best_epoch']}, "
        f"val {metrics['val_accuracy']:.2%}) in {metrics['train_seconds']:.1f}s of training, "
        f"{metrics['images_per_second']:,.0f} img/s on {metrics['device']}")
    log(publish(ckpt, out, force=force))
    log(f"metrics, history and plots in {out}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file (default: configs/train.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in <out_dir>/last.pt")
    parser.add_argument("--dry-run", action="store_true", help="3 batches per epoch: a quick check of the whole path")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--force", action="store_true", help="replace model.pt even if the new model is worse")
    parser.add_argument("--test-every-epoch", action="store_true", help="score the test set after every epoch")
    cfglib.add_flags(parser, TrainConfig())
    args = parser.parse_args(argv)
    try:
        cfg = cfglib.from_args(TrainConfig(), args, args.config)
        if os.environ.get("MNIST_DIR") and args.__dict__.get("cfg:data_dir") is None:
            cfg = cfglib.apply(cfg, {"data_dir": os.environ["MNIST_DIR"]})
        fit(cfg, resume=args.resume, dry_run=args.dry_run, quiet=args.quiet, force=args.force,
            test_every_epoch=args.test_every_epoch)
    except (ValueError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is in {cfg.out_dir}/last.pt; "
              "continue with `make train ARGS=--resume`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
