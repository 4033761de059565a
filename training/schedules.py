"""SGDR warm restarts (`schedule: cosine_restarts`): cosine decay that jumps back to the peak lr.

Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (2017). The first
cycle lasts `restart_period` epochs, each later one `restart_mult` times longer, so with period 2
and multiplier 2 the restarts fall after epochs 2, 6, 14, ... The trainer steps schedules once per
batch, so the periods are converted to optimizer steps here.
"""

from __future__ import annotations

import torch


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
