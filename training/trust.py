"""After training: fit the temperature and the "not a digit" detector, and measure both.

The training loop calls `fit_trust` once the best epoch is chosen; its result goes into the
checkpoint (`temperature`, `ood`) and from there into the `.mar` (serving/archive.py).
`make calibrate` and `make trust-eval` run it on a saved checkpoint (training/tools/trust.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.calibration import calibrated_softmax, expected_calibration_error, fit_temperature, plot_reliability
from training.core.model import Net
from training.core.ood import (
    DEFAULT_METHOD,
    features_and_logits,
    fit_detector,
    is_digit,
    ood_score,
    set_threshold,
)
from training.core.tensors import normalize


@torch.no_grad()
def outputs(model: Net, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(detector features, logits) for uint8 (N, 28, 28) images on the model's device, returned on the CPU."""
    model.eval()
    weight = next(p for p in model.parameters() if p.dim() == 4)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size]).to(weight.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f, z = features_and_logits(model, x)
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
    return torch.cat(feats), torch.cat(logits)


def fit_trust(model: Net, train: tuple, val: tuple, test: tuple, out_dir: Path | None = None,
              method: str = DEFAULT_METHOD) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint fields, metrics) from (images, labels) splits; writes reliability.png to out_dir.

    Temperature and threshold come from the validation split (the training split when there is
    none); the detector's class statistics from the training split; the test split is only reported.
    """
    train_f, train_z = outputs(model, train[0])
    val_f, val_z = outputs(model, val[0]) if len(val[0]) else (train_f, train_z)
    val_y = (val[1] if len(val[0]) else train[1]).cpu()
    test_f, test_z = outputs(model, test[0])
    test_y = test[1].cpu()
    temperature = fit_temperature(val_z, val_y)
    detector = fit_detector(method, train_f, train[1].cpu(), temperature, width=model.classifier[-1].in_features)
    set_threshold(detector, ood_score(detector, val_f, val_z))
    before, after = torch.softmax(test_z, 1), calibrated_softmax(test_z, temperature)
    if out_dir is not None:
        plot_reliability(before, after, test_y, temperature, Path(out_dir) / "reliability.png")
    metrics = {
        "temperature": round(temperature, 6),
        "test_ece_before": round(expected_calibration_error(before, test_y), 6),
        "test_ece_after": round(expected_calibration_error(after, test_y), 6),
        "val_ece_before": round(expected_calibration_error(torch.softmax(val_z, 1), val_y), 6),
        "val_ece_after": round(expected_calibration_error(calibrated_softmax(val_z, temperature), val_y), 6),
        "ood_method": method,
        "ood_threshold": round(detector["threshold"], 6),
        "ood_test_false_rejection": round(1 - float(is_digit(detector, ood_score(detector, test_f, test_z))
                                                    .double().mean()), 6),
    }
    return {"temperature": temperature, "ood": detector}, metrics

