"""Base vs fine-tuned candidate, and whether to promote: `make finetune-report CANDIDATE=...`.

Scores both checkpoints on the MNIST test set and on the feedback the candidate held out (its
`finetune` provenance names the rows): accuracy, calibration (ECE after each model's own temperature)
and the is_digit rate (digit rows its detector accepts; "not a digit" rows it rejects). The verdict is
GO only when both hold: MNIST test accuracy no more than MAX_MNIST_DROP below the base's, and held-out
feedback accuracy at least the base's. Exit status 0 for GO, 3 for NO-GO, so `make finetune-report &&
make promote VERSION=...` promotes only a candidate that passed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from training.calibration import calibrated_softmax, expected_calibration_error
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.cli import ArgumentParser
from training.core.ood import is_digit, ood_score
from training.data import DataError, data_dir, ensure_mnist, load_split
from training.feedback.models import NOT_A_DIGIT
from training.feedback.store import DB_HELP, FeedbackStore, FeedbackStoreError, images_and_labels
from training.trust import outputs

MAX_MNIST_DROP = 0.001  # 0.1 point of MNIST test accuracy
NO_GO = 3


def score(ckpt: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """Accuracy and ECE over the digit rows, is_digit rate over the digit rows and over the others."""
    if not len(images):
        return {"count": 0}
    features, logits = outputs(model_from_checkpoint(ckpt), images)
    digits = labels != NOT_A_DIGIT
    accepted = is_digit(ckpt["ood"], ood_score(ckpt["ood"], features, logits)) if "ood" in ckpt \
        else torch.ones(len(labels), dtype=torch.bool)
    result: dict[str, float | int] = {"count": len(labels), "digits": int(digits.sum())}
    if digits.any():
        probabilities = calibrated_softmax(logits[digits], ckpt.get("temperature", 1.0))
        result["accuracy"] = float((logits[digits].argmax(1) == labels[digits]).double().mean())
        result["ece"] = expected_calibration_error(probabilities, labels[digits])
        result["is_digit_rate"] = float(accepted[digits].double().mean())
    if (~digits).any():
        result["not_a_digit_rejected"] = float((~accepted[~digits]).double().mean())
    return result


def verdict(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """(GO?, the reasons): MNIST within MAX_MNIST_DROP of the base, held-out feedback no worse."""
    base, cand = report["base"], report["candidate"]
    reasons, go = [], True
    drop = base["mnist"]["accuracy"] - cand["mnist"]["accuracy"]
    ok = drop <= MAX_MNIST_DROP + 1e-12
    go &= ok
    reasons.append(f"MNIST test accuracy {'within' if ok else 'NOT within'} {MAX_MNIST_DROP:.1%} of the base "
                   f"(change {-drop:+.2%})")
    if "accuracy" not in cand["feedback"]:
        return False, [*reasons, "no held-out digit feedback to judge the candidate on (use --holdout > 0)"]
    gain = cand["feedback"]["accuracy"] - base["feedback"]["accuracy"]
    go &= gain >= 0
    reasons.append(f"held-out feedback accuracy {'not below' if gain >= 0 else 'BELOW'} the base's ({gain:+.2%})")
    return go, reasons


def compare(base_path: Path, candidate_path: Path, store: FeedbackStore, data: str) -> dict[str, Any]:
    candidate = load_checkpoint(candidate_path)
    if "finetune" not in candidate:
        raise CheckpointError(f"{candidate_path} has no finetune provenance: write it with `make finetune`")
    held = set(candidate["finetune"]["feedback_holdout_ids"])
    rows = [r for r in store.rows() if r.id in held]
    fb_x, fb_y = (torch.from_numpy(a) for a in images_and_labels(rows))
    test_x, test_y = load_split(data, train=False)
    report: dict[str, Any] = {"base_path": str(base_path), "candidate_path": str(candidate_path),
                              "held_out_rows": len(rows)}
    for name, ckpt in (("base", load_checkpoint(base_path)), ("candidate", candidate)):
        report[name] = {"mnist": score(ckpt, test_x, test_y), "feedback": score(ckpt, fb_x, fb_y)}
    go, reasons = verdict(report)
    return {**report, "go": go, "reasons": reasons}


def table(report: dict[str, Any]) -> str:
    lines = [f"{'':<10} {'set':<9} {'rows':>6} {'accuracy':>9} {'ECE':>7} {'is_digit':>9}"]
    for name in ("base", "candidate"):
        for part in ("mnist", "feedback"):
            s = report[name][part]
            lines.append(f"{name:<10} {part:<9} {s.get('count', 0):>6} {s.get('accuracy', float('nan')):>9.2%} "
                         f"{s.get('ece', float('nan')):>7.2%} {s.get('is_digit_rate', float('nan')):>9.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.recipes.finetune_report", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("artifacts/model.pt"))
    parser.add_argument("--candidate", type=Path, default=Path("artifacts/finetune/model.pt"))
    parser.add_argument("--db", default=None, help=DB_HELP)
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    args = parser.parse_args(argv)
    try:
        ensure_mnist(data := str(data_dir(args.data_dir)))
        report = compare(args.base, args.candidate, FeedbackStore(args.db), data)
    except (CheckpointError, DataError, FeedbackStoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.candidate.with_name("finetune-report.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print("\n".join(f"  {r}" for r in report["reasons"]))
    print(f"{'GO: promote it' if report['go'] else 'NO-GO: keep the base'} (report in {out})")
    return 0 if report["go"] else NO_GO


if __name__ == "__main__":
    sys.exit(main())
