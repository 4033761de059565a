"""Score a checkpoint on printed digits in Debian's fonts through the server's own decoding: `make eval-fonts`.

Every picture of training/tools/fonts.py is decoded by the handler's `decode_request` and classified as a
worker does it (`serving_model`, `to_model_input`, calibrated softmax), and `is_digit` is the
archive's "not a digit" verdict, computed as the handler computes it (`features_and_logits`,
`ood_score`, `is_digit`). A refused picture counts as wrong and not a digit: the client got no
answer. Prints a table per face and digit, writes a results record (bench/record.py) and draws
every 28×28 input the model saw into artifacts/fonts_seen.png, mistakes framed.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench.record import write_record
from serving.archive import DEFAULT_VARIANT
from serving.worker.requests import decode_request
from serving.worker.variants import serving_model, to_model_input
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.cli import ArgumentParser
from training.core.inputs.preprocess import SIZE, PreprocessError
from training.core.model import Net
from training.core.ood import features_and_logits, is_digit, ood_score
from training.tools.fonts import FACES, STYLES, FontsMissing, font_set


def score(ckpt: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """One row per picture: face, digit, style, the 28×28 input (None if refused), guess, confidence, is_digit."""
    model = serving_model(model_from_checkpoint(ckpt), DEFAULT_VARIANT)
    assert isinstance(model, Net)  # fused: the CNN itself, whose features the detector reads
    detector, temperature = ckpt.get("ood"), float(ckpt.get("temperature", 1.0))
    rows: list[dict[str, Any]] = []
    for face, digit, style, request in font_set(seed):
        try:
            seen = decode_request(request)
        except PreprocessError:
            seen = None
        rows.append({"face": face.name, "digit": digit, "style": style, "seen": seen,
                     "guess": -1, "confidence": 0.0, "is_digit": False})
    kept = [row for row in rows if row["seen"] is not None]
    with torch.inference_mode():
        features, logits = features_and_logits(model, to_model_input(np.stack([r["seen"] for r in kept])))
        probabilities = torch.softmax(logits.float() / temperature, dim=1)
        digit_like = (is_digit(detector, ood_score(detector, features, logits)) if detector is not None
                      else torch.ones(len(kept), dtype=torch.bool))
    confidence, guess = probabilities.max(1)
    for row, g, p, ok in zip(kept, guess.tolist(), confidence.tolist(), digit_like.tolist(), strict=True):
        row.update(guess=g, confidence=p, is_digit=bool(ok))
    return rows


def rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = max(1, len(rows))
    return {"pictures": len(rows), "accuracy": round(sum(r["guess"] == r["digit"] for r in rows) / n, 4),
            "is_digit": round(sum(r["is_digit"] for r in rows) / n, 4),
            "refused": sum(r["seen"] is None for r in rows)}


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record: overall, per digit, per face, per style, and every mistake or refusal."""
    groups: dict[str, dict[Any, list]] = {"per_digit": defaultdict(list), "per_face": defaultdict(list),
                                           "per_style": defaultdict(list)}
    for r in rows:
        groups["per_digit"][str(r["digit"])].append(r)
        groups["per_face"][r["face"]].append(r)
        groups["per_style"][r["style"]].append(r)
    wrong = [{k: (round(v, 4) if k == "confidence" else v) for k, v in r.items() if k != "seen"}
             for r in rows if r["guess"] != r["digit"] or not r["is_digit"]]
    return {**rates(rows), **{k: {name: rates(g) for name, g in v.items()} for k, v in groups.items()},
            "mistakes": wrong}


def print_tables(rows: list[dict[str, Any]]) -> None:
    """Face × digit: how many of the STYLES pictures were right and called a digit ('·' = all)."""
    styles = len(STYLES)
    print(f"| face | {' | '.join(map(str, range(10)))} | accuracy | is_digit |")
    print(f"|---|{'---:|' * 10}---:|---:|")
    by_face: dict[str, list] = defaultdict(list)
    for r in rows:
        by_face[r["face"]].append(r)
    for face in FACES:
        cells = []
        for digit in range(10):
            mine = [r for r in by_face[face.name] if r["digit"] == digit]
            right = sum(r["guess"] == digit for r in mine)
            trusted = sum(r["is_digit"] for r in mine)
            wrong = sorted({str(r["guess"]) if r["guess"] >= 0 else "refused" for r in mine if r["guess"] != digit})
            cell = "·" if right == trusted == styles else f"{right}/{styles}"
            cell += f" →{','.join(wrong)}" if wrong else ""
            cell += f" ({styles - trusted} not digit)" if trusted < styles else ""
            cells.append(cell)
        s = rates(by_face[face.name])
        print(f"| {face.name} | {' | '.join(cells)} | {s['accuracy']:.1%} | {s['is_digit']:.1%} |")
    print("\n| style | pictures | accuracy | is_digit | refused |\n|---|---:|---:|---:|---:|")
    for style in STYLES:
        s = rates([r for r in rows if r["style"] == style])
        print(f"| {style} | {s['pictures']} | {s['accuracy']:.2%} | {s['is_digit']:.2%} | {s['refused']} |")
    s = rates(rows)
    print(f"| **all** | {s['pictures']} | {s['accuracy']:.2%} | {s['is_digit']:.2%} | {s['refused']} |")
    print("\n| digit | " + " | ".join(map(str, range(10))) + " |\n|---|" + "---:|" * 10)
    for key in ("accuracy", "is_digit"):
        per = [rates([r for r in rows if r["digit"] == d])[key] for d in range(10)]
        print(f"| {key} | " + " | ".join(f"{p:.1%}" for p in per) + " |")


def draw_seen(rows: list[dict[str, Any]], path: Path, zoom: int = 2) -> None:
    """Every 28×28 input, a row per face and style, a column per digit; a mistake framed red, a
    right answer called "not a digit" framed orange, a refusal left empty."""
    cell = SIZE * zoom + 4
    lines = [(face.name, style) for face in FACES for style in STYLES]
    sheet = np.full((cell * len(lines), cell * 10, 3), 40, np.uint8)
    index = {name: i for i, name in enumerate(lines)}
    for r in rows:
        y, x = index[(r["face"], r["style"])] * cell, r["digit"] * cell
        if r["guess"] != r["digit"]:
            sheet[y : y + cell, x : x + cell] = (0, 0, 255)
        elif not r["is_digit"]:
            sheet[y : y + cell, x : x + cell] = (0, 165, 255)
        if r["seen"] is not None:
            big = cv2.resize(r["seen"], (SIZE * zoom, SIZE * zoom), interpolation=cv2.INTER_NEAREST)
            sheet[y + 2 : y + cell - 2, x + 2 : x + cell - 2] = big[:, :, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), sheet)


def tables(checkpoint: str, result: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The record's tables (docs/render.py draws them): the whole set, and per style."""
    ones = result["per_digit"]["1"]
    whole = {"checkpoint": checkpoint, "pictures": str(result["pictures"]), "accuracy": f"{result['accuracy']:.2%}",
             "is_digit": f"{result['is_digit']:.2%}", "1s right": f"{ones['accuracy']:.1%}",
             "1s is_digit": f"{ones['is_digit']:.1%}", "refused": str(result["refused"])}
    styles = [{"style": name, "pictures": str(v["pictures"]), "accuracy": f"{v['accuracy']:.2%}",
               "is_digit": f"{v['is_digit']:.2%}"} for name, v in result["per_style"].items()]
    return {"font_set": [whole], "per_style_table": styles}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.eval_fonts", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt")
    parser.add_argument("--seed", type=int, default=0, help="the photo style's lighting and noise")
    parser.add_argument("--seen", default="artifacts/fonts_seen.png", type=Path)
    parser.add_argument("--no-record", action="store_true", help="print only; write no results record")
    args = parser.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        torch.set_num_threads(1)  # the work is decoding, one picture at a time; the model is one small batch
        rows = score(ckpt, args.seed)
    except (CheckpointError, FontsMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"checkpoint {args.checkpoint}, variant {DEFAULT_VARIANT}, {len(FACES)} faces × 10 digits × "
          f"{len(STYLES)} styles ({', '.join(STYLES)}), seed {args.seed}\n")
    print_tables(rows)
    draw_seen(rows, args.seen)
    print(f"\nwhat the model saw: {args.seen}")
    if not args.no_record:
        result = figures(rows)
        path = write_record("eval-fonts", {"checkpoint": str(args.checkpoint), "seed": args.seed, **result,
                                           "tables": tables(str(args.checkpoint), result)})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
