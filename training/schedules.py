"""The optimiser and its learning-rate schedule (configs/train.yaml: optimizer, lr, schedule, ...).

SGDR warm restarts (`schedule: cosine_restarts`): cosine decay that jumps back to the peak lr.

Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (2017). The first
cycle lasts `restart_period` epochs, each later one `restart_mult` times longer, so with period 2
and multiplier 2 the restarts fall after epochs 2, 6, 14, ... The trainer steps schedules once per
batch, so the periods are converted to optimizer steps here.
"""

from __future__ import annotations

import torch

from training import config as cfglib
from training.core.model import Net
from training.train_config import TrainConfig


def restart_steps(period_steps: int, mult: int, total_steps: int) -> list[int]:
    """The optimizer steps at which the learning rate jumps back to its peak (within `total_steps`)."""
    steps, start, length = [], 0, period_steps
    while start + length < total_steps:
        start += length
        steps.append(start)
        length *= mult
    return steps


def warm_restarts(opt: torch.optim.Optimizer, period_steps: int, mult: int,
                  min_lr: float = 0.0) -> torch.optim.lr_scheduler.CosineAnnealingWarmRestarts:
    """torch's own SGDR scheduler, with the period in optimizer steps (>= 1)."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, period_steps), T_mult=mult,
                                                                eta_min=min_lr)


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
        if total < 5:  # OneCycleLR divides by the warm-up's length in steps minus one
            raise cfglib.ConfigError(f"the one-cycle schedule needs at least 5 steps, this run has {total} "
                                     "(epochs × steps per epoch): use more images or epochs, or a smaller batch")
        # A run too short for its warm-up share to span more than one step warms up over 1.25 steps instead.
        warmup = max(cfg.warmup, 1.25 / total)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=warmup,
                                                   cycle_momentum=cfg.cycle_momentum)
    if cfg.schedule == "cosine_restarts":
        return warm_restarts(opt, cfg.restart_period * steps, cfg.restart_mult)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
    return None
