"""Does fine-tuning on corrections teach the model a user's hand? `make bench-feedback`.

The user's hand is training/feedback/style.py's slanted thin pen on MNIST test digits, in a seeded
order: the first 1,000 are the feedback pool, the next `--eval` the evaluation part (never trained
on). For 50, 200 and 1,000 corrections (the first n of the pool, stored in a fresh SQLite feedback
database exactly as the API stores them) the served model is fine-tuned by `make finetune`'s own
function, then base and candidate are scored on the evaluation part and on the MNIST test set
(all 10k, as training scores it; and the 9k whose restyled copies were never in the pool). Over
`--seeds` seeds; writes a record under results/ (docs: Feedback loop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.record import write_record
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import data_dir, ensure_mnist, load_split
from training.feedback.store import Correction, FeedbackStore
from training.feedback.style import user_set
from training.recipes.finetune import FinetuneOptions, finetune
from training.trust import outputs

POOL = 1000


def accuracy(ckpt: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = outputs(model_from_checkpoint(ckpt), images)
    return float((logits.argmax(1) == labels).double().mean())


def store_corrections(url: str, base: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> FeedbackStore:
    """The pool's first n as the API would store them: what the base answered, and the user's label."""
    store = FeedbackStore(url)
    _, logits = outputs(model_from_checkpoint(base), torch.from_numpy(images))
    probabilities = torch.softmax(logits / base.get("temperature", 1.0), 1)
    for image, label, p in zip(images, labels, probabilities, strict=True):
        store.add(Correction(image=image.tobytes(), model_name="mnist", model_version="1.0",
                            answer=int(p.argmax()), confidence=float(p.max()), is_digit=True, label=int(label),
                            source="bench"))
    return store


def _mean_std(values: list[float], scale: float = 100) -> str:
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("artifacts/model.pt"))
    parser.add_argument("--sizes", default="50,200,1000", help="corrections per run, at most 1000")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval", type=int, default=2000, help="digits in the evaluation part")
    parser.add_argument("--epochs", type=int, default=FinetuneOptions.epochs)
    parser.add_argument("--replay-ratio", type=float, default=FinetuneOptions.replay_ratio)
    parser.add_argument("--freeze-convs", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dry-run", action="store_true", help="3 batches per epoch, one seed: no figures")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(not 0 < n <= POOL for n in sizes):
        parser.error(f"--sizes are 1..{POOL}")
    ensure_mnist(data := str(data_dir()))
    test_x, test_y = load_split(data, train=False)
    styled, labels, source = user_set(test_x.numpy(), test_y.numpy())
    part = slice(POOL, POOL + args.eval)
    eval_x, eval_y = torch.from_numpy(styled[part]), torch.from_numpy(labels[part])
    unseen = torch.ones(len(test_y), dtype=torch.bool)
    unseen[torch.from_numpy(source[:POOL])] = False
    base = load_checkpoint(args.base)
    before = {"eval": accuracy(base, eval_x, eval_y), "mnist": accuracy(base, test_x, test_y),
              "mnist_unseen": accuracy(base, test_x[unseen], test_y[unseen])}
    print(f"base: user-style eval {before['eval']:.2%}, MNIST test {before['mnist']:.2%}", flush=True)
    runs = []
    for n in sizes:
        for seed in range(1 if args.dry_run else args.seeds):
            options = FinetuneOptions(epochs=args.epochs, replay_ratio=args.replay_ratio, holdout=0.0,
                                      freeze_convs=args.freeze_convs, seed=seed)
            with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
                store = store_corrections(f"sqlite:///{tmp}/feedback.db", base, styled[:n], labels[:n])
                start = time.perf_counter()
                finetune(args.base, store.rows(), Path(tmp) / "run", options, data, args.device,
                         dry_run=args.dry_run)
                seconds = time.perf_counter() - start
                store.close()
                cand = load_checkpoint(Path(tmp) / "run" / "model.pt")
            run = {"corrections": n, "seed": seed, "seconds": round(seconds, 1),
                   "eval": accuracy(cand, eval_x, eval_y), "mnist": accuracy(cand, test_x, test_y),
                   "mnist_unseen": accuracy(cand, test_x[unseen], test_y[unseen])}
            runs.append(run)
            print(f"  {n:>5} corrections, seed {seed}: eval {run['eval']:.2%}, MNIST {run['mnist']:.2%} "
                  f"({seconds:.0f}s)", flush=True)
    rows = [row(n, [r for r in runs if r["corrections"] == n], before) for n in sizes]
    print(render(rows))
    if not args.no_record and not args.dry_run:
        settings = {"epochs": args.epochs, "replay_ratio": args.replay_ratio, "freeze_convs": args.freeze_convs,
                    "eval_digits": len(eval_y), "seeds": args.seeds, "base": str(args.base)}
        path = write_record("bench-feedback", {"tables": {"feedback": rows}, "runs": runs, "settings": settings},
                            baseline={"eval_accuracy": before["eval"], "mnist_test_accuracy": before["mnist"],
                                      "mnist_unseen_accuracy": before["mnist_unseen"]})
        print(f"record: {path}")
    return 0


def row(n: int, runs: list[dict[str, Any]], before: dict[str, float]) -> dict[str, str]:
    drop = [(before["mnist"] - r["mnist"]) * 100 for r in runs]
    return {"corrections": str(n), "user-style before (%)": f"{before['eval'] * 100:.2f}",
            "user-style after (%)": _mean_std([r["eval"] for r in runs]),
            "MNIST before (%)": f"{before['mnist'] * 100:.2f}",
            "MNIST after (%)": _mean_std([r["mnist"] for r in runs]),
            "MNIST drop (points, worst seed)": f"{max(drop):+.2f}",
            "MNIST 9k unseen after (%)": _mean_std([r["mnist_unseen"] for r in runs]),
            "seconds per run": f"{statistics.mean(r['seconds'] for r in runs):.0f}"}


def render(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r[h] for h in header) + " |" for r in rows)])


if __name__ == "__main__":
    sys.exit(main())
