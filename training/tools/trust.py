"""Refit or measure a checkpoint's calibrated confidence and "not a digit" detector: `make calibrate`,
`make trust-eval`.

    python -m training.tools.trust --checkpoint artifacts/model.pt          # refit a checkpoint in place
    python -m training.tools.trust --checkpoint artifacts/model.pt --eval   # OOD table for every method

The first form upgrades a checkpoint trained before this existed (one without a temperature
loads as T = 1.0 everywhere); the second prints the numbers that chose the OOD method.
The fitting itself is training/trust.py's, which `make train` runs after the best epoch is chosen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint
from training.cli import ArgumentParser
from training.config import apply
from training.core.inputs.preprocess import PreprocessError, to_mnist
from training.core.model import Net
from training.core.ood import METHODS, auroc, fit_detector, is_digit, ood_score, set_threshold
from training.data import DataError, data_dir
from training.splits import load_data
from training.train_config import TrainConfig
from training.trust import fit_trust, outputs


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
    from training.tools.ood_data import load_fashion, synthetic_sets

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
    parser = ArgumentParser(prog="python -m training.tools.trust", description=__doc__.splitlines()[0])
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
        data = load_data(apply(cfg, {"data_dir": str(data_dir(args.data_dir))}), torch.device("cpu"))
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
