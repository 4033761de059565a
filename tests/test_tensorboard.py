"""TensorBoard run logs: per-epoch scalars and misclassified digits, read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.core.model import ModelConfig, Net
from training.tensorboard import RunLog, misclassified

ROW = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.25, "train_accuracy": 0.875, "val_accuracy": 0.9375,
       "lr": 0.05, "images_per_second": 1000.0}


class Constant(torch.nn.Module):
    """Predicts class 3 for every image: the misclassified ones are exactly those not labelled 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()


def test_misclassified_returns_the_wrong_images_with_true_and_predicted_labels():
    x = torch.arange(5, dtype=torch.uint8).view(5, 1, 1).expand(5, 28, 28).contiguous()
    y = torch.tensor([3, 1, 3, 7, 3])
    images, labels = misclassified(Constant(), x, y)
    assert labels == ["1→3", "7→3"]
    assert images.shape == (2, 1, 28, 28) and images[:, 0, 0, 0].tolist() == [1, 3]


def test_a_run_log_holds_the_epoch_curves_and_the_misclassified_digits(tmp_path):
    x = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = (torch.arange(64) % 10 + 1) % 10  # untrained net: some of these are surely wrong
    log = RunLog(tmp_path / "run")
    log.epoch(ROW, Net(ModelConfig(conv1=4, conv2=8, hidden=16)), x, y)
    log.test(Net(ModelConfig(conv1=4, conv2=8, hidden=16)), x, y, accuracy=0.5, step=1)
    log.close()

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "accuracy/test_final"} <= set(
        tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("accuracy/val")] == [(1, 0.9375)]
    assert events.Scalars("lr")[0].value == pytest.approx(0.05)  # stored as float32
    assert {"val/misclassified", "test/misclassified"} <= set(tags["images"])


def test_a_disabled_run_log_writes_nothing(tmp_path):
    log = RunLog(None)
    log.epoch(ROW, Constant(), torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([1, 2]))
    log.close()
    assert list(tmp_path.iterdir()) == []
