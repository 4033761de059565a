"""How `fit` runs, and what a recipe plugs into it: RunOptions (resume, dry run, quiet...) and Hooks
(per-epoch callback, stop, the loss). The config (training/train_config.py) says what is trained."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from training.splits import Splits
from training.train_config import TrainConfig

# The training loss of one batch: (logits, augmented input, labels, the batch's indices into the training
# split) → a scalar. Distillation passes one that also reads the teacher (training/recipes/distill.py).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RunOptions:
    """How `fit` runs (the config says what it trains): resume from last.pt with the command line's
    `flags` (dotted name → value, which may change only RESUME_MAY_CHANGE), a dry run of 3 batches per
    epoch on slices, no progress output, replace a better model.pt, score the test set every epoch, or
    never load it (`score_test=False`: validation metrics, nothing published), the TensorBoard run name."""

    resume: bool = False
    dry_run: bool = False
    quiet: bool = False
    force: bool = False
    test_every_epoch: bool = False
    score_test: bool = True
    run_name: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hooks:
    """What a recipe plugs into the loop: `on_epoch(row)` sees each epoch's history row (tuning reports it
    and may raise to stop the run); `stop()` is asked before every step and ends the run with
    KeyboardInterrupt when true (Ctrl-C in tuning); `loss_fn` replaces the cross-entropy (distillation);
    `train_data(splits)` replaces the training images and `init_model(model)` starts from other weights
    before the optimiser is built (fine-tuning: corrections mixed with MNIST, the served model's weights,
    frozen layers). Validation and test stay MNIST's."""

    on_epoch: Callable[[dict], None] | None = None
    stop: Callable[[], bool] | None = None
    loss_fn: LossFn | None = None
    train_data: Callable[[Splits], Splits] | None = None
    init_model: Callable[[torch.nn.Module], None] | None = None


def cross_entropy(cfg: TrainConfig) -> LossFn:
    """The default loss: cross-entropy with the config's label smoothing."""
    return lambda logits, x, y, idx: F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
