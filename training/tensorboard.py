"""TensorBoard logging of a run: `make tensorboard` to watch loss, accuracy and learning rate.

One SummaryWriter per run, under `<out_dir>/runs/<run name>/`, written by rank 0 only (the other
ranks hold the same model and see the metrics summed over all ranks). Per epoch: train and
validation loss and accuracy, the learning rate, and a few misclassified validation digits; at the
end of a normal run, a few misclassified test digits of the best epoch. The per-epoch images are
drawn from validation, not test: looking at test errors after every epoch is how the test set
quietly becomes a second validation set.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from training.core.tensors import normalize

SHOWN = 8  # misclassified digits per image grid
SCANNED = 1000  # images searched for them: enough to find a few errors at 99%+, one cheap inference pass


def default_run_name(seed: int) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"


def misclassified(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  limit: int = SHOWN) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` wrongly predicted images among the first SCANNED (uint8, N×1×28×28) and 'true→predicted'."""
    model.eval()
    x, y = x[:SCANNED], y[:SCANNED]
    with torch.inference_mode():
        predicted = model(normalize(x)).argmax(1)
    wrong = (predicted != y).nonzero().flatten()[:limit]
    labels = [f"{y[i].item()}→{predicted[i].item()}" for i in wrong.tolist()]
    return x[wrong].unsqueeze(1).cpu(), labels


class RunLog:
    """Write a run's curves and misclassified digits; every method is a no-op when disabled."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported only when a run logs

            self.writer = SummaryWriter(str(log_dir))
        self.log_dir = log_dir

    def epoch(self, row: dict[str, Any], model: torch.nn.Module, val_x: torch.Tensor, val_y: torch.Tensor) -> None:
        if self.writer is None:
            return
        step = row["epoch"]
        for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/train", "train_accuracy"),
                         ("accuracy/val", "val_accuracy"), ("lr", "lr"), ("images_per_second", "images_per_second")):
            self.writer.add_scalar(tag, row[key], step)
        if "test_accuracy" in row:
            self.writer.add_scalar("accuracy/test", row["test_accuracy"], step)
        if len(val_x):
            self._digits("val/misclassified", model, val_x, val_y, step)

    def test(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, accuracy: float, step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("accuracy/test_final", accuracy, step)
        self._digits("test/misclassified", model, x, y, step)

    def _digits(self, tag: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        images, labels = misclassified(model, x, y)
        if labels and self.writer is not None:
            self.writer.add_images(tag, images.float() / 255, step, dataformats="NCHW")
            self.writer.add_text(tag, "true→predicted, left to right: " + ", ".join(labels), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
