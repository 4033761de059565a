"""The one training loop: `fit` trains, keeps the best epoch, scores, calibrates and writes a run's outputs.

`train_epoch` runs one epoch with the run's loss (cross-entropy by default; distillation passes its
own), bf16 autocast where it pays, gradient clipping, L1 and DDP under torchrun (each rank takes a
disjoint shard; metrics are summed over ranks; rank 0 alone prints and writes). Recipes build on it:
tuning (training/recipes/tune.py), distillation and ensembles.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training import config as cfglib
from training.augment import random_affine
from training.checkpoint import CheckpointError, read_checkpoint_file
from training.core import precision
from training.core.model import Net
from training.core.tensors import normalize
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
from training.metrics import confusion, summarize
from training.regularization import l1_penalty
from training.run_files import (
    hold_for_test,
    resume_config,
    run_metrics,
    save_last,
    write_outputs,
)
from training.run_options import Hooks, RunOptions, cross_entropy
from training.schedules import build_optimizer, build_schedule
from training.splits import Splits, dry_run_slices, fingerprint, load_data
from training.tensorboard import RunLog, default_run_name
from training.train_config import TrainConfig


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
                gen: torch.Generator, show: bool, dry_run: bool, hooks: Hooks | None = None) -> dict[str, float]:
    """One epoch; `hooks.stop()` true before a step raises KeyboardInterrupt there (tuning's Ctrl-C).
    `hooks.loss_fn`: the batch loss (default: cross_entropy(cfg)); L1 is added to it here."""
    hooks = hooks or Hooks()
    loss_fn, stop = hooks.loss_fn or cross_entropy(cfg), hooks.stop
    model.train()
    device = data.train_x.device
    gen.manual_seed(derived_seed(cfg.seed, epoch, dd.rank, "augment"))
    torch.manual_seed(derived_seed(cfg.seed, epoch, dd.rank, "dropout"))  # CPU and every CUDA device
    perm = epoch_shard(len(data.train_x), cfg.seed, epoch, dd).to(device)
    steps = steps_per_epoch(len(data.train_x), dd.world, cfg.batch_size)
    if dry_run:
        steps = min(steps, 3)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = precision.autocast(device, cfg.amp)  # CPU: only where native bf16 is faster (training/core/precision.py)
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
            loss = loss_fn(logits, x, y, idx)
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


def warm_up(model: Net, data: Splits, cfg: TrainConfig, compiled: torch.nn.Module | None = None) -> None:
    """One untimed forward and backward pass on a copy of the model, so epoch 1's time is training.

    On CUDA the first step pays the start-up: context, cuBLAS/cuDNN handles, cudnn.benchmark's
    algorithm search. A copy leaves the weights, batch-norm statistics and optimiser untouched, and
    its RNG draws do not matter: every epoch reseeds its own. `compiled` (torch.compile of the model):
    the pass runs through it instead, so the compilation happens here and not in epoch 1; the batch-norm
    statistics it moved are put back and its gradients dropped.
    """
    device = data.train_x.device
    saved = {k: v.clone() for k, v in model.state_dict().items()} if compiled is not None else None
    clone = compiled.train() if compiled is not None else copy.deepcopy(model).train()
    x = normalize(data.train_x[: cfg.batch_size])
    if cfg.augment:
        x = random_affine(x, cfg, torch.Generator(device=device).manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    with precision.autocast(device, cfg.amp):
        loss = F.cross_entropy(clone(x).float(), data.train_y[: cfg.batch_size])
    loss.backward()
    if saved is not None:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(cfg: TrainConfig, options: RunOptions | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train, keep the best epoch by validation accuracy, score it on the test set, write artifacts.

    Returns the metrics written to metrics.json (on every rank); with `options.score_test=False`, the
    validation metrics. `options` (RunOptions) and `hooks` (Hooks) say how, and what a recipe adds.
    """
    options, hooks = options or RunOptions(), hooks or Hooks()
    resume, dry_run, quiet, force = options.resume, options.dry_run, options.quiet, options.force
    test_every_epoch, score_test, run_name, flags = (options.test_every_epoch, options.score_test,
                                                     options.run_name, options.flags)
    on_epoch, stop = hooks.on_epoch, hooks.stop
    out = Path(cfg.out_dir)
    # cpu_bf16: the CPU precision decision, kept in last.pt so a resumed run trains as it began.
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_state": None, "best_val": -1.0, "stale": 0,
                             "cpu_bf16": None}
    if resume:
        last = out / "last.pt"
        saved = read_checkpoint_file(last, f"nothing to resume: {last} does not exist",
                                     advice="start the run again without --resume")
        cfg = resume_config(last, saved["config"], cfg, flags or {})
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
        if hooks.train_data is not None:
            data = hooks.train_data(data)
        board = RunLog(out / "runs" / (run_name or default_run_name(cfg.seed))
                       if cfg.tensorboard and dd.is_main else None)
        sets = {"val_set": fingerprint(data.val_x, data.val_y), "test_set": fingerprint(data.test_x, data.test_y)}
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = Net(cfg.model).to(device, memory_format=memory_format)
        if hooks.init_model is not None:
            hooks.init_model(model)
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
                                                          keep=state["cpu_bf16"], config=cfg.model)
        if device.type == "cuda":
            warm_up(model, data, cfg)
        net = model
        if dd.world > 1:
            device_ids = [local_rank] if device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.compile:  # compiled before the timer: its warm-up pass pays the compilation
            net = torch.compile(net)
            warm_up(model, data, cfg, compiled=net)
        log(f"training on {len(data.train_x):,} images ({len(data.val_x):,} validation, {len(data.test_x):,} test) "
            f"on {device}" + (f" × {dd.world} ranks" if dd.world > 1 else "")
            + f"; global batch {cfg.batch_size * dd.world}, peak lr {cfg.lr}, {cfg.optimizer}, {cfg.schedule}"
            + f"; {precision.describe(device, cfg.amp)}")
        if dd.is_main:
            out.mkdir(parents=True, exist_ok=True)

        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            stats = train_epoch(net, opt, sched, data, cfg, dd, epoch, gen, show=not quiet and dd.is_main,
                                dry_run=dry_run, hooks=hooks)
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
                save_last(out / "last.pt", model, opt, sched,
                           {**state, "config": cfglib.to_dict(cfg), "world_size": dd.world})
                hold_for_test(epoch, stop)
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
        metrics = run_metrics(cfg, dd, device, state, test, sets)
        if dd.is_main:
            metrics = write_outputs(out, model, cfg, metrics, state, opt, sched, force, say, data)
        leave_together(dd)
        return metrics
    finally:
        board.close()  # also for a pruned or interrupted run: the curves so far are flushed
        cleanup(dd)


