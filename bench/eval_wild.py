"""Score a checkpoint on the wild MNIST test set through the server's own decoding: `make eval-wild`.

Each test digit is rendered by every transform of training/tools/wild.py as the request a client sends,
decoded by the handler's `decode_request` (the code path TorchServe runs: JSON, base64, image
decoding, EXIF, `to_mnist`), and classified by the model as a worker runs it (`serving_model`,
`to_model_input`). Prints accuracy per transform beside the clean accuracy on the same digits, and
draws the most confident mistakes into artifacts/wild_failures.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.record import write_record
from serving.archive import DEFAULT_VARIANT
from serving.worker.requests import decode_request
from serving.worker.variants import serving_model, to_model_input
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.core.inputs.decode import load_image
from training.core.inputs.preprocess import PreprocessError
from training.tools.wild import TRANSFORMS, render


@dataclass
class Score:
    name: str
    correct: int = 0
    total: int = 0
    refused: int = 0
    seconds: float = 0.0
    failures: list[tuple[float, int, int, int, np.ndarray | None]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)


def predict(model: torch.nn.Module, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its probability) for uint8 N×28×28 digits, as the handler computes them."""
    with torch.inference_mode():
        probabilities = torch.softmax(model(to_model_input(digits)).float(), dim=1)
    confidence, predicted = probabilities.max(1)
    return predicted.numpy(), confidence.numpy()


def score_transform(name: str, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                    seed: int) -> Score:
    score = Score(name, total=len(images))
    start = time.perf_counter()
    digits, kept = [], []
    for i, image in enumerate(images):
        try:
            digits.append(decode_request(render(name, image, i, seed)))
            kept.append(i)
        except PreprocessError:  # a refusal is a wrong answer: the client got no digit
            score.refused += 1
            score.failures.append((1.0, i, int(labels[i]), -1, None))
    if digits:
        predicted, confidence = predict(model, np.stack(digits))
        for i, digit, guess, p in zip(kept, digits, predicted, confidence, strict=True):
            if guess == labels[i]:
                score.correct += 1
            else:
                score.failures.append((float(p), i, int(labels[i]), int(guess), digit))
    score.seconds = time.perf_counter() - start
    return score


def plot_failures(scores: list[Score], images: np.ndarray, seed: int, path: Path, count: int = 24) -> None:
    """The `count` most confident mistakes: what was sent (shrunk) beside what the model saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = sorted(((f, s.name) for s in scores for f in s.failures), key=lambda t: -t[0][0])[:count]
    columns = 6
    rows = max(1, -(-len(worst) // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.1, rows * 1.45))
    for ax in np.ravel(axes):
        ax.axis("off")
    for k, ((p, i, label, guess, seen), name) in enumerate(worst):
        ax_sent, ax_seen = np.ravel(axes)[2 * k], np.ravel(axes)[2 * k + 1]
        try:
            sent = load_image(_image_bytes(render(name, images[i], i, seed)))
            ax_sent.imshow(sent, cmap="gray", vmin=0, vmax=255)
        except PreprocessError:
            pass
        if seen is not None:
            ax_seen.imshow(seen, cmap="gray", vmin=0, vmax=255)
        verdict = "refused" if guess < 0 else f"{label}→{guess} {p:.0%}"
        ax_sent.set_title(f"{name[:14]}\n#{i} {verdict}", fontsize=6, loc="left")
    fig.suptitle("Wild MNIST: most confident mistakes (left: sent, right: what the model saw)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _image_bytes(request: dict[str, bytes]) -> bytes:
    """The image inside a rendered request (the data-URL transform wraps it in JSON)."""
    import base64
    import json

    body = request["body"]
    if body[:1] == b"{":
        return base64.b64decode(json.loads(body)["data"].split(",", 1)[1])
    return body


def main(argv: list[str] | None = None) -> int:
    from training.data import DataError, load_split

    parser = argparse.ArgumentParser(prog="python -m bench.eval_wild", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt")
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--limit", type=int, default=1000, help="the first N test digits per transform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transforms", default=",".join(TRANSFORMS), help="comma-separated names")
    parser.add_argument("--failures", default="artifacts/wild_failures.png", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="20 digits per transform: checks the path")
    args = parser.parse_args(argv)
    names = [n for n in args.transforms.split(",") if n]
    if unknown := set(names) - set(TRANSFORMS):
        print(f"error: unknown transforms {sorted(unknown)}: choose from {list(TRANSFORMS)}", file=sys.stderr)
        return 1
    try:
        ckpt = load_checkpoint(args.checkpoint)
        images, labels = load_split(args.data_dir, train=False)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)  # the work is decoding, one image at a time; the model is a small batch
    limit = 20 if args.dry_run else args.limit
    images, labels = images[:limit].numpy(), labels[:limit].numpy()
    model = serving_model(model_from_checkpoint(ckpt), DEFAULT_VARIANT)
    clean = float((predict(model, images)[0] == labels).mean())
    print(f"checkpoint {args.checkpoint}, variant {DEFAULT_VARIANT}, first {len(images)} MNIST test digits, "
          f"seed {args.seed}")
    print(f"| transform | digits | accuracy | vs clean | refused | ms/digit |\n|---|---:|---:|---:|---:|---:|\n"
          f"| clean 28×28 (training's tensors) | {len(images)} | {clean:.2%} |  |  |  |")
    scores = []
    for name in names:
        s = score_transform(name, model, images, labels, args.seed)
        scores.append(s)
        print(f"| {name} | {s.total} | {s.accuracy:.2%} | {100 * (s.accuracy - clean):+.2f} | {s.refused} | "
              f"{1000 * s.seconds / s.total:.1f} |", flush=True)
    overall = sum(s.correct for s in scores) / max(1, sum(s.total for s in scores))
    worst = min(scores, key=lambda s: s.accuracy)
    print(f"| **all wild** | {sum(s.total for s in scores)} | {overall:.2%} | {100 * (overall - clean):+.2f} | "
          f"{sum(s.refused for s in scores)} |  |")
    plot_failures(scores, images, args.seed, args.failures)
    print(f"worst transform: {worst.name} {worst.accuracy:.2%} ({100 * (worst.accuracy - clean):+.2f} points); "
          f"most confident mistakes drawn in {args.failures}")
    if not args.dry_run:  # a dry run measures nothing: no record
        rows = [{"transform": s.name, "digits": s.total, "accuracy": f"{s.accuracy:.2%}",
                 "vs clean": f"{100 * (s.accuracy - clean):+.2f}", "refused": s.refused,
                 "ms/digit": f"{1000 * s.seconds / s.total:.1f}"} for s in scores]
        rows.append({"transform": "all wild", "digits": sum(s.total for s in scores), "accuracy": f"{overall:.2%}",
                     "vs clean": f"{100 * (overall - clean):+.2f}", "refused": sum(s.refused for s in scores)})
        record = write_record("eval-wild", {"tables": {"transforms": rows}, "checkpoint": str(args.checkpoint)},
                              baseline={"clean 28×28 accuracy (same digits)": f"{clean:.2%}", "digits": len(images)})
        print(f"record: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
