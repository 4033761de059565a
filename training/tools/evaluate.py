"""Score a model on MNIST: accuracy, loss, confusion matrix, per-class precision/recall/F1, plots.

`make evaluate` (`python -m training.tools.evaluate`) re-scores a checkpoint on the test set.
"""

from __future__ import annotations

import json
import sys

from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.cli import ArgumentParser
from training.metrics import confusion, summarize


def main(argv: list[str] | None = None) -> int:
    from training.data import DataError, load_split

    parser = ArgumentParser(prog="python -m training.tools.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt")
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        images, labels = load_split(args.data_dir, train=False)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    model = model_from_checkpoint(ckpt)
    matrix, loss = confusion(model, images, labels)
    result = summarize(matrix, loss.item())
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "confusion_matrix"}, indent=2))
        return 0
    recorded = ckpt.get("metrics", {}).get("test_accuracy")
    print(f"checkpoint     {args.checkpoint}")
    print(f"test accuracy  {result['accuracy']:.4%}  (recorded at training: "
          f"{'n/a' if recorded is None else f'{recorded:.4%}'})")
    print(f"test loss      {result['loss']:.4f}  over {result['count']} images")
    print("class  precision  recall  f1")
    for name, m in result["per_class"].items():
        print(f"{name:>5}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
