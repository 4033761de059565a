"""Train the MNIST CNN: `make train`, `python -m training.train`, or `torchrun ... -m training.train`.

The whole dataset lives on the device as uint8 tensors; batches are gathered by index and augmented
there, so there is no DataLoader and no worker process. Under torchrun each rank takes a disjoint
shard of every epoch and the metrics are summed over ranks; rank 0 alone prints and writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training import config as cfglib
from training import precision
from training.checkpoint import CheckpointError, atomic_save, make_checkpoint, publish, read_checkpoint_file
from training.config import ArgumentParser
from training.data import DataError, load_split
from training.distributed import (
    Dist,
    cleanup,
    derived_seed,
    epoch_shard,
    leave_together,
    setup_distributed,
    steps_per_epoch,
    sync_buffers,
)
from training.evaluate import confusion, plot_confusion, plot_curves, summarize
from training.model import ModelConfig, Net
from training.preprocess import MNIST_MEAN, MNIST_STD
from training.printed import with_printed_strokes
from training.regularization import l1_penalty
from training.schedules import warm_restarts
from training.tensorboard import RunLog, default_run_name
from training.tensors import normalize
from training.trust import fit_trust

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
    # Training digits redrawn in print's shapes (training/printed.py): this fraction of the upright 1s
    # gets a flag (half of them a foot too) and of the 7s a crossbar; `broad_pen` of the others get
    # upright strokes thicker than horizontal ones, as serif and bold faces have. 0 disables either.
    printed_strokes: float = 0.3
    broad_pen: float = 0.2
    val_size: int = 5000
    early_stop: int = 0  # stop after this many epochs without a better validation accuracy; 0 disables
    train_limit: int = 0  # use only this many training images (0: all); for quick runs and tests
    test_limit: int = 0
    threads: int = 0  # CPU intra-op threads; 0: all cores (divided between local ranks)
    amp: bool = True  # bf16 autocast on CUDA, and on CPU where native bf16 is faster (training/precision.py)
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
        if not (0 <= self.printed_strokes <= 1 and 0 <= self.broad_pen <= 1):
            raise cfglib.ConfigError("printed_strokes and broad_pen are fractions in 0..1, "
                                     f"got {self.printed_strokes} and {self.broad_pen}")


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
        count = torch.cuda.device_count()
        if local_rank >= count:  # e.g. `make train-ddp NPROC=2` on a one-GPU host
            raise cfglib.ConfigError(f"local rank {local_rank} has no GPU: this host has {count} CUDA device(s); "
                                     f"run at most {count} process(es) per node, or pass --device cpu")
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


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    total = cfg.epochs * steps  # steps per epoch: exactly what train_epoch takes, or OneCycleLR refuses to step
    if cfg.schedule == "onecycle":
        if total < 5:  # its warm-up phase (25% of the steps) must span more than one step
            raise cfglib.ConfigError(f"the one-cycle schedule needs at least 5 steps, this run has {total} "
                                     "(epochs × steps per epoch): use more images or epochs, or a smaller batch")
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine_restarts":
        return warm_restarts(opt, cfg.restart_period * steps, cfg.restart_mult)
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

    Some training digits are redrawn in print's shapes (`printed_strokes`, `broad_pen`); validation
    and test stay MNIST. test=False (hyperparameter search) never reads the test split: its tensors
    are empty.
    """
    images, labels = load_split(cfg.data_dir, train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_limit:
        train_idx = train_idx[: cfg.train_limit]
    train_x, train_y = images[train_idx], labels[train_idx]
    if cfg.printed_strokes or cfg.broad_pen:
        train_x = torch.from_numpy(with_printed_strokes(train_x.numpy(), train_y.numpy(), cfg.printed_strokes,
                                                        cfg.broad_pen, cfg.seed))
    if test:
        test_x, test_y = load_split(cfg.data_dir, train=False)
    else:
        test_x, test_y = images[:0], labels[:0]
    if cfg.test_limit:
        test_x, test_y = test_x[: cfg.test_limit], test_y[: cfg.test_limit]
    return Splits(*(t.to(device) for t in (train_x, train_y, images[val_idx],
                                           labels[val_idx], test_x, test_y)))


# A dry run trains 3 batches per epoch and scores, calibrates and plots on slices (the whole path in
# seconds, not a minute): enough training images for 8 one-cycle steps per epoch at batch 1024.
DRY_RUN_SLICES = {"train": 8192, "val": 1000, "test": 2000}


def dry_run_slices(data: Splits) -> Splits:
    n = DRY_RUN_SLICES
    return Splits(data.train_x[: n["train"]], data.train_y[: n["train"]], data.val_x[: n["val"]],
                  data.val_y[: n["val"]], data.test_x[: n["test"]], data.test_y[: n["test"]])


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Size and SHA-256 of a split: `publish` compares only runs scored on equal ones."""
    digest = hashlib.sha256(images.cpu().numpy().tobytes())
    digest.update(labels.cpu().numpy().tobytes())
    return {"count": len(labels), "sha256": digest.hexdigest()[:16]}


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
                gen: torch.Generator, show: bool, dry_run: bool,
                stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One epoch; `stop()` true before a step raises KeyboardInterrupt there (training/tune.py's Ctrl-C)."""
    model.train()
    device = data.train_x.device
    gen.manual_seed(derived_seed(cfg.seed, epoch, dd.rank, "augment"))
    torch.manual_seed(derived_seed(cfg.seed, epoch, dd.rank, "dropout"))  # CPU and every CUDA device
    perm = epoch_shard(len(data.train_x), cfg.seed, epoch, dd).to(device)
    steps = steps_per_epoch(len(data.train_x), dd.world, cfg.batch_size)
    if dry_run:
        steps = min(steps, 3)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = precision.autocast(device, cfg.amp)  # CPU: only where native bf16 is faster (training/precision.py)
    # Summed on the device and read once per epoch: a per-step .item() or host→device copy would
    # make the host wait for the GPU at every step. The image count is known on the host.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
    count = 0
    bar = Progress(show, steps * cfg.batch_size, epoch, cfg.epochs)
    start = time.perf_counter()
    for step in range(steps):
        if stop is not None and stop():
            raise KeyboardInterrupt
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
            sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        count += len(y)
        if bar.bar is not None and step % 20 == 0:  # a terminal's progress bar reads the sums (and waits)
            loss_sum, correct = sums.tolist()
            bar.update(20 * cfg.batch_size if step else cfg.batch_size, loss=f"{loss_sum / count:.3f}",
                       acc=f"{correct / count:.2%}", ips=f"{count * dd.world / (time.perf_counter() - start):.0f}")
    bar.close()
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)])
    if dd.world > 1:
        dist.all_reduce(totals)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, correct, images = totals.tolist()
    return {"train_loss": loss_sum / images, "train_accuracy": correct / images, "train_images": int(images),
            "seconds": seconds, "images_per_second": images / seconds}


def warm_up(model: Net, data: Splits, cfg: TrainConfig) -> None:
    """One untimed forward and backward pass on a copy of the model, so epoch 1's time is training.

    On CUDA the first step pays the start-up: context, cuBLAS/cuDNN handles, cudnn.benchmark's
    algorithm search. A copy leaves the weights, batch-norm statistics and optimiser untouched, and
    its RNG draws do not matter: every epoch reseeds its own.
    """
    device = data.train_x.device
    clone = copy.deepcopy(model).train()
    x = normalize(data.train_x[: cfg.batch_size])
    if cfg.augment:
        x = random_affine(x, cfg, torch.Generator(device=device).manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    with precision.autocast(device, cfg.amp):
        loss = F.cross_entropy(clone(x).float(), data.train_y[: cfg.batch_size])
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save_last(path: Path, model: Net, opt, sched, state: dict[str, Any]) -> None:
    # No RNG state: every epoch reseeds its draws (derived_seed), so this file resumes on any device.
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "schedule": sched.state_dict() if sched is not None else None, **state}, path)


# Test-only hook: with MNIST_TEST_HOLD_AFTER_EPOCH=N a run waits (up to 10 min) right after last.pt of
# epoch N is written, so a Ctrl-C test (tests/test_faults.py) interrupts it at a known point instead of
# racing the machine's speed. Unset in every normal run.
HOLD_ENV = "MNIST_TEST_HOLD_AFTER_EPOCH"


def _hold_for_test(epoch: int) -> None:
    if os.environ.get(HOLD_ENV) == str(epoch):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.05)


# What --resume lets the command line change: where the run reads and writes, and what it runs on.
# Any other flag would make the resumed run a different run than the one saved.
RESUME_MAY_CHANGE = ("data_dir", "out_dir", "device", "threads")


def _resume_config(last: Path, saved: dict[str, Any], cfg: TrainConfig, flags: dict[str, Any]) -> TrainConfig:
    """The config saved in last.pt, with the directories of `cfg`; `flags` (given on the command line,
    dotted name → value) may also change the device and thread count, and must agree on the rest."""
    resumed = cfglib.apply(TrainConfig(), {**saved, "out_dir": cfg.out_dir, "data_dir": cfg.data_dir})
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


def fit(cfg: TrainConfig, resume: bool = False, dry_run: bool = False, quiet: bool = False,
        force: bool = False, test_every_epoch: bool = False, flags: dict[str, Any] | None = None,
        on_epoch: Callable[[dict], None] | None = None, score_test: bool = True,
        run_name: str | None = None, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train, keep the best epoch by validation accuracy, score it on the test set, write artifacts.

    With `resume`, the run continues with the config saved in last.pt; `flags` are the config keys
    given on the command line (dotted name → value), which may change only RESUME_MAY_CHANGE.
    Returns the metrics written to metrics.json (on every rank). `on_epoch(row)` sees each epoch's
    history row (training/tune.py reports it to Optuna and may raise to stop the run);
    score_test=False never loads the test split and returns validation metrics without publishing;
    `stop()` is asked before every training step and stops the run with KeyboardInterrupt when true.
    """
    out = Path(cfg.out_dir)
    # cpu_bf16: the CPU precision decision, kept in last.pt so a resumed run trains as it began.
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_state": None, "best_val": -1.0, "stale": 0,
                             "cpu_bf16": None}
    if resume:
        last = out / "last.pt"
        saved = read_checkpoint_file(last, f"nothing to resume: {last} does not exist",
                                     advice="start the run again without --resume")
        cfg = _resume_config(last, saved["config"], cfg, flags or {})
        if saved["epoch"] >= cfg.epochs or saved.get("finished"):
            raise CheckpointError(f"{out / 'last.pt'} is from a finished run: nothing to resume")
        state.update({k: saved.get(k, state[k]) for k in state})

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
    gen = torch.Generator(device=device)  # augmentation draws: train_epoch seeds it per epoch and rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once

    board = RunLog(None)

    try:
        if resume and saved.get("world_size", 1) != dd.world:
            raise CheckpointError(f"{last} is from a run on {saved.get('world_size', 1)} process(es), this one has "
                                  f"{dd.world}: resume it on as many (the shards and the schedule depend on it)")
        data = load_data(cfg, device, test=score_test)
        if dry_run:
            data = dry_run_slices(data)
        board = RunLog(out / "runs" / (run_name or default_run_name(cfg.seed))
                       if cfg.tensorboard and dd.is_main else None)
        sets = {"val_set": fingerprint(data.val_x, data.val_y), "test_set": fingerprint(data.test_x, data.test_y)}
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = Net(cfg.model).to(device, memory_format=memory_format)
        opt = build_optimizer(model, cfg)
        sched = build_schedule(opt, cfg, steps_per_epoch(len(data.train_x), dd.world, cfg.batch_size))
        if resume:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved["schedule"])
            log(f"resuming {out / 'last.pt'} after epoch {state['epoch']}/{cfg.epochs}"
                + "".join(f", with --{k} {getattr(cfg, k)} (saved: {saved['config'][k]})"
                          for k in ("device", "threads") if getattr(cfg, k) != saved["config"][k]))
        if device.type == "cpu" and cfg.amp:  # time bf16 against fp32 now, not inside epoch 1
            state["cpu_bf16"] = precision.decide_cpu_bf16(agree=dist.all_reduce if dd.world > 1 else None,
                                                          keep=state["cpu_bf16"])
        if device.type == "cuda":
            warm_up(model, data, cfg)
        net = model
        if dd.world > 1:
            device_ids = [local_rank] if device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.compile:
            net = torch.compile(net)
        log(f"training on {len(data.train_x):,} images ({len(data.val_x):,} validation, {len(data.test_x):,} test) "
            f"on {device}" + (f" × {dd.world} ranks" if dd.world > 1 else "")
            + f"; global batch {cfg.batch_size * dd.world}, peak lr {cfg.lr}, {cfg.optimizer}, {cfg.schedule}"
            + f"; {precision.describe(device, cfg.amp)}")
        if dd.is_main:
            out.mkdir(parents=True, exist_ok=True)

        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            stats = train_epoch(net, opt, sched, data, cfg, dd, epoch, gen, show=not quiet and dd.is_main,
                                dry_run=dry_run, stop=stop)
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
                _save_last(out / "last.pt", model, opt, sched,
                           {**state, "config": cfglib.to_dict(cfg), "world_size": dd.world})
                _hold_for_test(epoch)
            if on_epoch is not None:
                on_epoch(row)
            if cfg.early_stop and state["stale"] >= cfg.early_stop:
                log(f"early stop: no better validation accuracy for {cfg.early_stop} epochs")
                break

        model.load_state_dict(state["best_state"])
        if not score_test:
            leave_together(dd)
            best = max(state["history"], key=lambda h: h["val_accuracy"])
            return {"val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
                    "epochs": len(state["history"]), "train_seconds": state["history"][-1]["train_seconds"]}
        test = score(model, data.test_x, data.test_y, dd)
        board.test(model, data.test_x, data.test_y, test["accuracy"], state["epoch"])
        metrics = _metrics(cfg, dd, device, state, test, sets)
        if dd.is_main:
            metrics = _write_outputs(out, model, cfg, metrics, state, opt, sched, force, say, data)
        leave_together(dd)
        return metrics
    finally:
        board.close()  # also for a pruned or interrupted run: the curves so far are flushed
        cleanup(dd)


def _metrics(cfg: TrainConfig, dd: Dist, device: torch.device, state: dict, test: dict,
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
        "seed": cfg.seed, "precision": precision.describe(device, cfg.amp), **_peak_memory_mb(device), **sets,
        "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
    }


def _peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """The process's peak resident memory, and on CUDA the peak memory its tensors took on the GPU."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss, 1), "peak_cuda_mb": None if cuda is None else round(cuda, 1)}


def _write_outputs(out: Path, model: Net, cfg: TrainConfig, metrics: dict, state: dict, opt, sched,
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
    _save_last(out / "last.pt", model, opt, sched, {**state, "config": cfglib.to_dict(cfg),
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


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file (default: configs/train.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in <out_dir>/last.pt with its saved config (flags may change "
                             "only " + ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_MAY_CHANGE) + ")")
    parser.add_argument("--dry-run", action="store_true",
                        help="3 batches per epoch, scored on slices: a quick check of the whole path")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--force", action="store_true",
                        help="replace model.pt even if the new model is worse or not comparable")
    parser.add_argument("--test-every-epoch", action="store_true", help="score the test set after every epoch")
    cfglib.add_flags(parser, TrainConfig())
    args = parser.parse_args(argv)
    try:
        cfg = cfglib.from_args(TrainConfig(), args, args.config)
        if os.environ.get("MNIST_DIR") and args.__dict__.get("cfg:data_dir") is None:
            cfg = cfglib.apply(cfg, {"data_dir": os.environ["MNIST_DIR"]})
        flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
        fit(cfg, resume=args.resume, dry_run=args.dry_run, quiet=args.quiet, force=args.force,
            test_every_epoch=args.test_every_epoch, flags=flags)
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
