"""Calibrated confidence: temperature scaling fitted on the validation split, and how to measure it.

A network trained with label smoothing and augmentation is under-confident on clean digits: its
softmax says 0.9 where it is right 99.5% of the time. One scalar fixes that without changing any
prediction: logits / T, with T chosen to minimise the validation negative log-likelihood (Guo et
al., 2017, "On Calibration of Modern Neural Networks"). Expected calibration error (ECE) over 15
equal-width confidence bins is the number that says whether it worked.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

ECE_BINS = 15


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Σ over confidence bins of |accuracy − mean confidence| × fraction of samples in the bin.

    Bins are (0, 1/bins], (1/bins, 2/bins], ...: a confidence of exactly 1.0 falls in the last one.
    """
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    confidence = confidence.double()
    index = (confidence * bins).ceil().clamp(1, bins).long() - 1
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    return float((conf_sum - correct_sum).abs().sum() / len(labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on these labels.

    The NLL is convex in β = 1/T (the logits scale linearly with β), so a golden-section search on β
    finds the one minimum: deterministic, no learning rate, no step count to tune.
    """
    logits, labels = logits.double(), labels.long()

    def nll(beta: float) -> float:
        return float(F.cross_entropy(logits * beta, labels))

    low, high = 1e-3, 100.0
    ratio = (5**0.5 - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(50):  # the bracket shrinks by 0.618 per step: 100 → 4e-9
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return 1.0 / ((low + high) / 2)


def calibrated_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=1)


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
                     ) -> tuple[list[float], list[float], list[int]]:
    """Per bin: mean confidence, accuracy and count (empty bins: NaN, NaN, 0)."""
    confidence, predicted = probabilities.max(1)
    index = (confidence.double() * bins).ceil().clamp(1, bins).long() - 1
    conf, acc, count = [], [], []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        conf.append(float(confidence[mask].double().mean()) if n else float("nan"))
        acc.append(float((predicted[mask] == labels[mask]).double().mean()) if n else float("nan"))
        count.append(n)
    return conf, acc, count


def plot_reliability(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, temperature: float,
                     path: Path) -> None:
    """Reliability diagram, before and after temperature scaling, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    width = 1 / ECE_BINS
    for ax, probs, name in ((axes[0], before, "before (T = 1)"), (axes[1], after, f"after (T = {temperature:.3f})")):
        conf, acc, count = reliability_bins(probs, labels)
        centres = [(b + 0.5) * width for b in range(ECE_BINS)]
        ax.bar(centres, [0 if n == 0 else a for a, n in zip(acc, count, strict=True)], width=width,
               edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot([c for c, n in zip(conf, count, strict=True) if n], [a for a, n in zip(acc, count, strict=True) if n],
                "ro", ms=4, label="(mean confidence, accuracy)")
        for centre, n in zip(centres, count, strict=True):  # sparse bins are noisy: show how many they hold
            if n:
                ax.text(centre, 0.02, str(n), ha="center", va="bottom", fontsize=6, rotation=90)
        ece = expected_calibration_error(probs, labels)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{name}: ECE {ece:.2%}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"MNIST test reliability ({len(labels):,} digits, {ECE_BINS} bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
