""""Is this a digit at all?": an out-of-distribution score on the network's own outputs, and its threshold.

Four scores, higher meaning more digit-like; docs: Trust has the table that chose the default:
- msp: the largest calibrated softmax probability (Hendrycks & Gimpel, 2017).
- energy: T·logsumexp(logits / T) (Liu et al., 2020); unlike msp it keeps the logits' magnitude.
- mahalanobis: minus the smallest Mahalanobis distance of the penultimate features (the 128 values
  before the last linear layer) to a class mean, with one covariance shared by the classes (Lee et
  al., 2018).
- mahalanobis_all: the same on the penultimate features plus each conv block's channel means
  (32 + 64 values: how much of each low-level pattern the image holds). Lee et al. combine layers
  too. A shoe or a texture can push one logit high and even land near a digit class in the last
  layer (a briefly trained model does), but its stroke statistics are far from any digit's.

The threshold is a quantile of the scores of MNIST validation digits (FALSE_REJECTION), so it
depends on the model and MNIST alone, not on how a served image is cropped and centred. Per request
the cost is one 128×128 matrix-vector product: a few percent of the CNN's own flops.

This file is packed into the `.mar` (the handler scores every answer), so it imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch

from training.core.model import Net

METHODS = ("msp", "energy", "mahalanobis", "mahalanobis_all")
DEFAULT_METHOD = "mahalanobis_all"  # best AUROC against Fashion-MNIST and text: docs: Trust
# Half the 1% budget of rejected real digits: validation and test differ by sampling noise.
FALSE_REJECTION = 0.005


def features_and_logits(model: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of `training.core.model.Net` that also returns what the detector reads:
    [channel means of conv block 1, of conv block 2, the input of the last linear layer]."""
    pooled = []
    h = x
    for block in model.features:
        h = block(h)
        pooled.append(h.mean((2, 3)))
    hidden = model.classifier[:-1](h)
    return torch.cat([*pooled, hidden], 1), model.classifier[-1](hidden)


def _columns(detector: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
    # mahalanobis reads only the penultimate features: the last `width` columns.
    return features[:, -detector["width"]:] if detector["method"] == "mahalanobis" else features


def ood_score(detector: dict[str, Any], features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Score per row (higher: more like an MNIST digit) with the method and statistics in `detector`."""
    method, temperature = detector["method"], float(detector.get("temperature", 1.0))
    logits = logits.float()
    if method == "msp":
        return torch.softmax(logits / temperature, dim=1).amax(1)
    if method == "energy":
        return temperature * torch.logsumexp(logits / temperature, dim=1)
    if method.startswith("mahalanobis"):
        # ‖L(f − μ_c)‖² with P = LᵀL: whitening once, then squared distances to the whitened means.
        white = _columns(detector, features).float() @ detector["whitening"].T
        return -torch.cdist(white, detector["white_means"]).pow(2).amin(1)
    raise ValueError(f"unknown OOD method {method!r}: choose one of {', '.join(METHODS)}")


def fit_detector(method: str, train_features: torch.Tensor, train_labels: torch.Tensor,
                 temperature: float = 1.0, width: int = 0) -> dict[str, Any]:
    """The statistics a method needs: for mahalanobis, class means and the whitening of their shared covariance.

    `width`: how many of the last feature columns are the penultimate layer (read by "mahalanobis").
    """
    if method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r}: choose one of {', '.join(METHODS)}")
    detector: dict[str, Any] = {"method": method, "temperature": float(temperature), "width": width}
    if method.startswith("mahalanobis"):
        f = _columns(detector, train_features).double()
        classes = int(train_labels.max()) + 1
        # A class absent from a tiny training slice gets a mean no feature is near, instead of NaN.
        means = torch.stack([f[train_labels == c].mean(0) if (train_labels == c).any() else torch.full_like(f[0], 1e6)
                             for c in range(classes)])
        centred = f - means[train_labels]
        cov = centred.T @ centred / len(f)
        # A small ridge: ReLU features have dead directions, so the covariance is singular as measured.
        cov += 1e-4 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        whitening = torch.linalg.cholesky(torch.linalg.inv(cov)).T  # P = LᵀL with L = this
        detector["whitening"] = whitening.float().contiguous()
        detector["white_means"] = (means @ whitening.T).float().contiguous()
    return detector


def set_threshold(detector: dict[str, Any], val_scores: torch.Tensor,
                  false_rejection: float = FALSE_REJECTION) -> dict[str, Any]:
    """Reject scores below the `false_rejection` quantile of the MNIST validation digits' scores."""
    detector["threshold"] = float(torch.quantile(val_scores.double(), false_rejection))
    detector["false_rejection_target"] = false_rejection
    return detector


def is_digit(detector: dict[str, Any], scores: torch.Tensor) -> torch.Tensor:
    return scores >= detector["threshold"]


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """P(a random in-distribution score > a random out-of-distribution one), ties counted half (exact)."""
    ordered = in_scores.double().sort().values
    out = out_scores.double()
    above = len(ordered) - torch.searchsorted(ordered, out, right=True)
    ties = torch.searchsorted(ordered, out, right=True) - torch.searchsorted(ordered, out, right=False)
    return float((above.double().sum() + 0.5 * ties.double().sum()) / (len(ordered) * len(out)))
