"""What a training run is: `TrainConfig`, its defaults in code, configs/train.yaml for what users change.

Every field is a command-line flag of `make train` (`--lr 0.05`, `--model.dropout 0.2`): training/config.py
turns a dataclass into flags and YAML into a checked instance, with one-line errors for unknown keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from training import config as cfglib
from training.core.model import ModelConfig
from training.data import data_dir

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train.yaml"


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = "data"
    out_dir: str = "artifacts"
    device: str = "auto"  # auto | cuda | mps | cpu
    seed: int = 0
    epochs: int = 4
    batch_size: int = 128  # per process; under torchrun the global batch is this × world size
    optimizer: str = "nesterov"  # sgd | nesterov | adam | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | cosine_restarts | plateau | none
    warmup: float = 0.15  # onecycle: fraction of the steps spent rising to the peak lr
    cycle_momentum: bool = False  # onecycle: true cycles momentum 0.95 → 0.85 → 0.95 against the lr (torch's default)
    restart_period: int = 2  # cosine_restarts: epochs in the first cycle (training/schedules.py)
    restart_mult: int = 2  # cosine_restarts: each cycle this many times longer than the one before
    l1: float = 0.0  # L1 penalty on conv/linear weights (training/regularization.py); 0 disables
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    label_smoothing: float = 0.1
    augment: bool = True
    rotate: float = 6.0  # degrees
    shift: float = 0.06  # fraction of the image side
    scale: float = 0.06  # ± relative zoom
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
    amp: bool = True  # bf16 autocast on CUDA, and on CPU where native bf16 is faster (training/core/precision.py)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (pays a one-off compile time)
    tensorboard: bool = True  # curves and misclassified digits in <out_dir>/runs/ (rank 0; `make tensorboard`)
    # pool_first: new runs train it; ModelConfig's own default (False) is what older runs trained (saved_base).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pool_first=True))

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
        if not 0 < self.warmup < 1:
            raise cfglib.ConfigError(f"warmup is a fraction of the steps in (0, 1), got {self.warmup}")
        if self.l1 < 0 or self.restart_period < 1 or self.restart_mult < 1:
            raise cfglib.ConfigError("l1 must be >= 0, restart_period and restart_mult >= 1")
        if not (0 <= self.printed_strokes <= 1 and 0 <= self.broad_pen <= 1):
            raise cfglib.ConfigError("printed_strokes and broad_pen are fractions in 0..1, "
                                     f"got {self.printed_strokes} and {self.broad_pen}")


def from_command_line(args, path: str) -> TrainConfig:
    """TrainConfig from the YAML file `path` and the flags in `args` (training/config.py: add_flags).
    $MNIST_DIR overrides the file's data_dir; a --data-dir flag overrides both."""
    cfg = cfglib.from_args(TrainConfig(), args, path)
    if "MNIST_DIR" in os.environ and args.__dict__.get("cfg:data_dir") is None:
        cfg = cfglib.apply(cfg, {"data_dir": str(data_dir())})  # training/data.py: $MNIST_DIR
    return cfg


def saved_base() -> TrainConfig:
    """What a run's saved train_config is applied onto (finetune, --resume, ensemble reuse): a field the run
    predates takes its default, except the architecture's, which takes ModelConfig's own (a run saved
    before `model.pool_first` existed trained batch norm before the pool, and its weights fit only that)."""
    return TrainConfig(model=ModelConfig())
