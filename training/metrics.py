"""Scores of a model on a split: the confusion matrix, per-class precision/recall/F1, and their plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.checkpoint import CLASS_NAMES
from training.core.tensors import normalize


@torch.no_grad()
def confusion(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 10×10 confusion matrix (rows: true, cols: predicted) and the summed loss.

    `images` are uint8 (N, 28, 28) on the model's device; summed (not mean) values let data-parallel
    ranks add their shards' results.
    """
    model.eval()
    matrix = torch.zeros(10, 10, dtype=torch.int64, device=images.device)
    loss = torch.zeros((), dtype=torch.float64, device=images.device)
    memory_format = _memory_format(model)
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size]).contiguous(memory_format=memory_format)
        y = labels[start : start + batch_size]
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        matrix += torch.bincount(y * 10 + logits.argmax(1), minlength=100).view(10, 10)
    return matrix, loss


def _memory_format(model: torch.nn.Module) -> torch.memory_format:
    weight = next(p for p in model.parameters() if p.dim() == 4)
    return torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) and \
        not weight.is_contiguous() else torch.contiguous_format


def summarize(matrix: torch.Tensor, loss: float) -> dict[str, Any]:
    """Accuracy, mean loss and per-class precision/recall/F1 from a confusion matrix."""
    m = matrix.double().cpu()
    total = m.sum().item()
    correct = m.diag()
    precision = correct / m.sum(0).clamp(min=1)
    recall = correct / m.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "accuracy": correct.sum().item() / total,
        "loss": float(loss) / total,
        "count": int(total),
        "per_class": {
            name: {"precision": round(p, 5), "recall": round(r, 5), "f1": round(f, 5)}
            for name, p, r, f in zip(CLASS_NAMES, precision.tolist(), recall.tolist(), f1.tolist(), strict=True)
        },
        "confusion_matrix": matrix.cpu().tolist(),
    }


def plot_confusion(matrix: list[list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.4))
    data = torch.tensor(matrix, dtype=torch.float64)
    ax.imshow((data + 1).log(), cmap="Blues")  # log scale: the diagonal would hide every mistake
    for i in range(10):
        for j in range(10):
            ax.text(j, i, str(int(data[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"MNIST test confusion matrix (accuracy {data.diag().sum() / data.sum():.2%})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="Loss")
    right.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    right.plot(epochs, [100 * h["val_accuracy"] for h in history], "o-", label="validation")
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
