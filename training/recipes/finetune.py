"""Fine-tune the served model on users' corrections: `make finetune`, `python -m training.recipes.finetune`.

Transfer learning from the current checkpoint (not from scratch): the stored corrections with a digit
label (training/feedback/store.py) are mixed with a replay sample of MNIST's training split, so the
model learns the users' hand without forgetting MNIST, and trained through the one training loop (`fit`
with the `train_data` and `init_model` hooks: same augmentation, calibration, "not a digit" detector and
outputs as any run). A seeded share of the feedback (`--holdout`) is never trained on: the compare report
(training/recipes/finetune_report.py) scores base and candidate on it. "Not a digit" rows are never
trained on (the model has no such class; its detector is refitted by `fit`); they are held out with the
rest and show in the report's is_digit rate. Writes <out>/model.pt with `finetune` provenance: the base
file's sha256 and version, the row ids trained on and held out, the seeds and the options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import config as cfglib
from training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from training.cli import ArgumentParser
from training.data import DataError, data_dir, ensure_mnist
from training.feedback.models import NOT_A_DIGIT, Feedback
from training.feedback.store import DB_HELP, FeedbackStore, FeedbackStoreError, images_and_labels
from training.loop import fit
from training.run_options import Hooks, RunOptions
from training.splits import Splits
from training.train_config import saved_base


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 3
    # A tenth of the base run's peak rate, without one-cycle's warm-up to it: the weights are already good.
    lr: float = 0.01
    replay_ratio: float = 10.0  # MNIST training images replayed per correction trained on
    min_replay: int = 2000  # ... and at least this many, so a few corrections do not swamp an epoch
    holdout: float = 0.2  # share of the feedback kept out of training, for the compare report
    freeze_convs: bool = False  # train the classifier head only
    seed: int = 0


class FinetuneError(Exception):
    pass


def split_feedback(rows: list[Feedback], holdout: float, seed: int) -> tuple[list[Feedback], list[Feedback]]:
    """(rows to train on, rows held out): a seeded permutation by row id, so the same rows always split
    the same way; "not a digit" rows are never trained on."""
    order = np.random.default_rng(seed).permutation(len(rows))
    held_count = round(holdout * len(rows))
    held = sorted((rows[i] for i in order[:held_count]), key=lambda r: r.id)
    train = sorted((rows[i] for i in order[held_count:] if rows[i].label != NOT_A_DIGIT), key=lambda r: r.id)
    return train, held


def mixed_training_split(images: torch.Tensor, labels: torch.Tensor, options: FinetuneOptions):
    """The `train_data` hook: the corrections plus a seeded replay sample of MNIST's training split
    (validation and test stay MNIST's: epochs are chosen and calibration fitted on MNIST)."""

    def train_data(data: Splits) -> Splits:
        replay = min(len(data.train_x), max(options.min_replay, round(options.replay_ratio * len(images))))
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(options.seed))[:replay]
        pick = pick.to(data.train_x.device)
        x = torch.cat([data.train_x[pick], images.to(data.train_x.device)])
        y = torch.cat([data.train_y[pick], labels.to(data.train_y.device)])
        return dataclasses.replace(data, train_x=x, train_y=y)

    return train_data


def start_from(state_dict: dict[str, torch.Tensor], freeze_convs: bool):
    """The `init_model` hook: the base model's weights; with `freeze_convs`, its feature extractor fixed."""

    def init_model(model: torch.nn.Module) -> None:
        model.load_state_dict(state_dict)
        if freeze_convs:
            features: torch.nn.Module = model.features  # type: ignore[assignment]  # Net's conv blocks
            for p in features.parameters():
                p.requires_grad_(False)

    return init_model


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finetune(base_path: Path, rows: list[Feedback], out: Path, options: FinetuneOptions, data: str,
             device: str = "auto", base_version: str = "", dry_run: bool = False, quiet: bool = True,
             source: str = "") -> dict[str, Any]:
    """Train the candidate into out/model.pt; returns fit's metrics with the `finetune` provenance."""
    base = load_checkpoint(base_path)
    train_rows, held = split_feedback(rows, options.holdout, options.seed)
    if not train_rows:
        raise FinetuneError(f"no digit corrections to train on ({len(rows)} rows, {len(held)} held out): "
                            "correct some answers on the page (`make ui`) or through the feedback API first")
    images, labels = (torch.from_numpy(a) for a in images_and_labels(train_rows))
    cfg = cfglib.apply(saved_base(), {**base["train_config"], "data_dir": data, "out_dir": str(out),
                                       "epochs": options.epochs, "lr": options.lr, "schedule": "cosine",
                                       "seed": options.seed, "device": device, "tensorboard": False,
                                       "early_stop": 0, "train_limit": 0, "test_limit": 0})
    hooks = Hooks(train_data=mixed_training_split(images, labels, options),
                  init_model=start_from(base["state_dict"], options.freeze_convs))
    metrics = fit(cfg, RunOptions(dry_run=dry_run, quiet=quiet, force=True), hooks)
    provenance = {"base": str(base_path), "base_sha256": sha256_of(base_path), "base_version": base_version,
                  "base_commit": base.get("provenance", {}).get("git_commit"), "feedback_source": source,
                  "feedback_train_ids": [r.id for r in train_rows], "feedback_holdout_ids": [r.id for r in held],
                  "options": dataclasses.asdict(options), "seed": options.seed}
    ckpt = load_checkpoint(out / "model.pt")
    ckpt["finetune"] = provenance
    atomic_save(ckpt, out / "model.pt")
    return {**metrics, "finetune": provenance}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.recipes.finetune", description=__doc__.splitlines()[0])
    defaults = FinetuneOptions()
    parser.add_argument("--base", type=Path, default=Path("artifacts/model.pt"), help="the model to start from")
    parser.add_argument("--base-version", default="", help="its served version, for the provenance (e.g. 1.0)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/finetune"), help="the candidate's run dir")
    parser.add_argument("--db", default=None, help=DB_HELP)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--replay-ratio", type=float, default=defaults.replay_ratio,
                        help=f"MNIST images replayed per correction (at least {defaults.min_replay})")
    parser.add_argument("--holdout", type=float, default=defaults.holdout, help="share of feedback held out")
    parser.add_argument("--freeze-convs", action="store_true", help="train the classifier head only")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--dry-run", action="store_true", help="3 batches per epoch: a quick check of the whole path")
    args = parser.parse_args(argv)
    if not 0 <= args.holdout < 1 or args.epochs < 1 or args.replay_ratio < 0:
        parser.error("--holdout must be in [0, 1), --epochs >= 1, --replay-ratio >= 0")
    options = FinetuneOptions(epochs=args.epochs, lr=args.lr, replay_ratio=args.replay_ratio, holdout=args.holdout,
                              freeze_convs=args.freeze_convs, seed=args.seed)
    try:
        store = FeedbackStore(args.db)
        rows = store.rows()
        ensure_mnist(data := str(data_dir(args.data_dir)))
        result = finetune(args.base, rows, args.out, options, data, args.device, args.base_version,
                          args.dry_run, quiet=False, source=store.safe_url())
    except (CheckpointError, DataError, FeedbackStoreError, FinetuneError, cfglib.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    done = result["finetune"]
    print(f"candidate {args.out / 'model.pt'}: {len(done['feedback_train_ids'])} corrections trained on, "
          f"{len(done['feedback_holdout_ids'])} held out; MNIST test {result['test_accuracy']:.2%}. Next: "
          f"`make finetune-report CANDIDATE={args.out / 'model.pt'}`, then `make archive CHECKPOINT=... VERSION=...`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
