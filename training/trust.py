"""After training: fit the temperature and the "not a digit" detector, and measure both.

`training.train` calls `fit_trust` once the best epoch is chosen; its result goes into the
checkpoint (`temperature`, `ood`) and from there into the `.mar` (serving/archive.py).

    python -m training.trust --checkpoint artifacts/model.pt          # refit a checkpoint in place
    python -m training.trust --checkpoint artifacts/model.pt --eval   # OOD table for every method

The first form upgrades a checkpoint trained before this existed (one without a temperature
loads as T = 1.0 everywhere); the second prints the numbers that chose the OOD method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.calibration import calibrated_softmax, expected_calibration_error, fit_temperature, plot_reliability
from training.config import ArgumentParser
from training.model import Net
from training.ood import (
    DEFAULT_METHOD,
    METHODS,
    auroc,
    features_and_logits,
    fit_detector,
    is_digit,
    ood_score,
    set_threshold,
)
from training.preprocess import PreprocessError, to_mnist
from training.tensors import normalize


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


def served(images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
    """What the server would feed the model for each 28×28 image, and how many it refuses with a 400."""
    kept, refused = [], 0
    for image in np.asarray(images, dtype=np.uint8):
        try:
            kept.append(to_mnist(image))
        except PreprocessError:
            refused += 1
    return torch.from_numpy(np.stack(kept)) if kept else torch.zeros(0, 28, 28, dtype=torch.uint8), refused


def evaluate_ood(model: Net, splits: dict[str, tuple], temperature: float) -> list[dict[str, Any]]:
    """For every method: AUROC of MNIST test against each OOD set and the rates at its validation threshold."""
    from training.ood_data import load_fashion, synthetic_sets

    train_f, _ = outputs(model, splits["train"][0])
    val_f, val_z = outputs(model, splits["val"][0])
    test_f, test_z = outputs(model, splits["test"][0])
    sets: dict[str, tuple] = {"fashion (train 10k, selection)": served(load_fashion(train=True)[0][:10_000]),
                              "fashion (test)": served(load_fashion(train=False)[0])}
    sets.update({name: served(images) for name, images in synthetic_sets().items()})
    sets["blank"] = served(np.zeros((10, 28, 28), np.uint8))
    ood_outputs = {name: outputs(model, images) if len(images) else None for name, (images, _) in sets.items()}
    rows = []
    for method in METHODS:
        detector = fit_detector(method, train_f, splits["train"][1], temperature,
                                width=model.classifier[-1].in_features)
        set_threshold(detector, ood_score(detector, val_f, val_z))
        mnist = ood_score(detector, test_f, test_z)
        row = {"method": method, "mnist_test_rejected": 1 - float(is_digit(detector, mnist).double().mean())}
        for name, (images, refused) in sets.items():
            out = ood_outputs[name]
            scores = ood_score(detector, *out) if out is not None else torch.zeros(0)
            accepted = int(is_digit(detector, scores).sum())
            row[name] = {"auroc": auroc(mnist, scores) if len(scores) else None,
                         "rejected": 1 - accepted / (len(images) + refused), "refused_400": refused}
        rows.append(row)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    print(f"{'method':<16} {'MNIST test rejected':>20}  " + "  ".join(f"{n:>30}" for n in names))
    print(f"{'':<16} {'':>20}  " + "  ".join(f"{'AUROC / rejected':>30}" for _ in names))
    for row in rows:
        cells = []
        for n in names:
            a = row[n]["auroc"]
            cells.append(f"{'—' if a is None else f'{a:.4f}':>20} / {row[n]['rejected']:>7.2%}")
        print(f"{row['method']:<16} {row['mnist_test_rejected']:>20.2%}  " + "  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint
    from training.config import apply
    from training.data import DataError
    from training.train import TrainConfig, load_data

    parser = ArgumentParser(prog="python -m training.trust", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--eval", action="store_true", help="print the OOD table for every method (no writes)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        saved = ckpt.get("train_config") or {}
        # The training split it was trained on; one from before printed strokes existed had none.
        keys = ("seed", "val_size", "train_limit", "printed_strokes", "broad_pen")
        cfg = apply(TrainConfig(), {"printed_strokes": 0.0, "broad_pen": 0.0,
                                    **{k: saved[k] for k in keys if k in saved}})
        import os

        data_dir = args.data_dir or os.environ.get("MNIST_DIR") or cfg.data_dir
        data = load_data(apply(cfg, {"data_dir": data_dir}), torch.device("cpu"))
        model = model_from_checkpoint(ckpt)
        splits = {"train": (data.train_x, data.train_y), "val": (data.val_x, data.val_y),
                  "test": (data.test_x, data.test_y)}
        if args.eval:
            rows = evaluate_ood(model, splits, float(ckpt.get("temperature", 1.0)))
            _print_table(rows)
            print(json.dumps(rows, indent=1))
            return 0
        fields, metrics = fit_trust(model, splits["train"], splits["val"], splits["test"],
                                    out_dir=args.checkpoint.parent)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ckpt.update(fields)
    ckpt["metrics"] = {**ckpt.get("metrics", {}), **metrics}
    atomic_save(ckpt, args.checkpoint)
    metrics_file = args.checkpoint.parent / "metrics.json"
    if metrics_file.is_file():
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), **metrics}, indent=2) + "\n")
    for key, value in metrics.items():
        print(f"{key:<26} {value}")
    print(f"wrote {args.checkpoint}, {args.checkpoint.parent / 'reliability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
