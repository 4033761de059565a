"""MNIST on the device for one run: the seeded train/validation split, the test set, and their fingerprints.

The whole dataset lives on the device as uint8 tensors; batches are gathered by index and augmented
there (training/augment.py), so there is no DataLoader and no worker process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from training.data import load_split
from training.printed_cache import printed_training_digits
from training.train_config import TrainConfig


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
        train_x = torch.from_numpy(printed_training_digits(train_x.numpy(), train_y.numpy(), cfg.printed_strokes,
                                                           cfg.broad_pen, cfg.seed, cfg.data_dir))
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
