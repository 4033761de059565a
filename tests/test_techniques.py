"""L1 regularisation and SGDR warm restarts do what their config options say (no MNIST needed)."""

from __future__ import annotations

import pytest
import torch

from training import config as cfglib
from training.core.model import ModelConfig, Net
from training.distributed import Dist
from training.loop import train_epoch
from training.regularization import l1_penalty, penalised
from training.schedules import build_optimizer, build_schedule, restart_steps
from training.splits import Splits
from training.train_config import TrainConfig

SMALL = ModelConfig(conv1=4, conv2=8, hidden=16)


def test_the_l1_penalty_is_the_sum_of_absolute_conv_and_linear_weights_only():
    model = Net(SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-0.5)  # biases and batch-norm scales too: they must not count
    weights = 4 * 9 + 8 * 4 * 9 + 16 * 8 * 7 * 7 + 10 * 16
    assert len(penalised(model)) == 4
    assert l1_penalty(model).item() == pytest.approx(0.5 * weights)


def _train(l1: float) -> Net:
    """One epoch of the real train_epoch on 512 random digits: the same draws, only l1 differs."""
    cfg = cfglib.apply(TrainConfig(), {"device": "cpu", "epochs": 1, "batch_size": 64, "lr": 0.05,
                                       "schedule": "none", "weight_decay": 0.0, "l1": l1, "augment": False})
    images = torch.randint(0, 256, (512, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(2))
    empty = images[:0], labels[:0]
    torch.manual_seed(0)
    model = Net(SMALL)
    opt = build_optimizer(model, cfg)
    train_epoch(model, opt, None, Splits(images, labels, *empty, *empty), cfg, Dist(), 1,
                torch.Generator().manual_seed(3), show=False, dry_run=False)
    return model


def test_l1_pulls_weights_toward_zero_compared_with_none():
    plain, sparse = _train(0.0), _train(5e-3)
    # Same data, initial weights and draws: the only difference is the penalty (8 SGD steps).
    assert l1_penalty(sparse).item() < 0.95 * l1_penalty(plain).item()
    small = [sum((p.abs() < 1e-3).sum().item() for p in penalised(m)) for m in (plain, sparse)]
    assert small[1] > small[0]


def test_cosine_restarts_jump_back_to_the_peak_lr_at_the_configured_steps():
    cfg = cfglib.apply(TrainConfig(), {"schedule": "cosine_restarts", "restart_period": 1, "restart_mult": 2,
                                       "epochs": 7, "lr": 0.1})
    steps_per_epoch = 10
    opt = build_optimizer(Net(SMALL), cfg)
    sched = build_schedule(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    jumps = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]]
    # Cycles of 1, 2 and 4 epochs: restarts after epochs 1 and 3 (the third cycle ends with the run).
    assert jumps == restart_steps(10, 2, 70) == [10, 30]
    assert lrs[0] == lrs[10] == lrs[30] == pytest.approx(0.1)
    assert lrs[9] < 0.01 and lrs[29] < 0.01 and lrs[69] < 0.001


def test_restart_options_are_checked():
    with pytest.raises(cfglib.ConfigError, match="restart_period"):
        cfglib.apply(TrainConfig(), {"schedule": "cosine_restarts", "restart_period": 0})
    with pytest.raises(cfglib.ConfigError, match="l1"):
        cfglib.apply(TrainConfig(), {"l1": -1e-5})
