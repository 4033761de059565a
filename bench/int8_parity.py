"""int8 answers against fp32 on this CPU: `make int8-parity`, `python -m bench.int8_parity`.

Quantises CHECKPOINT the ways the project ships and has shipped, runs all 10k MNIST test digits
through each, and prints the share whose digit equals the fp32 model's, with the largest int8
weight (<= 64: no int16 pair sum can saturate on a CPU without VNNI; see training/tools/export.py).
Run it once as is and once as the lowest ISA would (`make int8-parity ISA=avx2` caps PyTorch and
oneDNN to AVX2; ONNX Runtime has no such switch, which is why its int8 file is exact by construction).
Writes a results record (bench/record.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.record import machine, write_record
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.core.inputs.preprocess import normalize_array
from training.data import DataError, load_split
from training.tools.export import (
    ExportError,
    calibration_images,
    compile_int8,
    export_onnx,
    int8_weight_bound,
    load_runner,
    parity,
    predict_all,
    quantize_onnx,
    quantize_pt2e,
)

# ONNX Runtime picks its kernels from the CPU's features and has no cap: under ISA=avx2 its rows still
# ran this CPU's best ISA, and the record says so.
ORT_KERNELS = "ONNX Runtime (this CPU's best ISA: no cap exists)"
GOAL = 0.995  # argmax agreement with fp32 on the 10k test digits, on every x86 ISA class


def table_rows(rows: list[dict], digits: int) -> list[dict[str, str]]:
    """The record's table: one row per int8 build, as printed."""
    return [{"variant": r["variant"], "kernels": r["kernels"], "agreement with fp32": f"{r['agreement']:.2%}",
             "answers changed": str(round((1 - r["agreement"]) * digits)), "test accuracy": f"{r['accuracy']:.2%}",
             "max |weight|": str(r.get("max_abs_weight", "—"))} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_parity", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--aoti", action="store_true",
                        help="also compile the PT2E int8 model with AOTInductor (oneDNN int8 kernels; minutes)")
    parser.add_argument("--limit", type=int, default=10_000, help="test digits (default: all 10k)")
    args = parser.parse_args(argv)
    try:
        model = model_from_checkpoint(load_checkpoint(args.checkpoint))
        images, labels = load_split(None, train=False)
        calibration = calibration_images(None, 512)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    x, y = normalize_array(images[: args.limit].numpy()), labels[: args.limit].numpy()
    reference = predict_all(load_runner(args.checkpoint), x)
    rows = []
    print(f"{args.checkpoint}: {len(x):,} test digits; CPU {machine()['cpu']} ({machine()['isa_class']})")
    print(f"{'variant':36} {'agreement':>10} {'changed':>8} {'accuracy':>9} {'max |w|':>8}")
    with tempfile.TemporaryDirectory(prefix="int8-parity-") as tmp:
        folder = Path(tmp)
        export_onnx(model, folder / "fp32.onnx")
        candidates = {  # name: (7-bit weights?, the file it writes)
            "int8 onnx (shipped: 7-bit weights)": (True, folder / "a.onnx"),
            "int8 onnx (8-bit weights, before)": (False, folder / "b.onnx"),
        }
        for name, (seven_bit, path) in candidates.items():
            try:
                quantize_onnx(folder / "fp32.onnx", path, calibration, seven_bit=seven_bit)
            except ExportError as err:
                print(f"{name}: {err}", file=sys.stderr)
                continue
            rows.append({"variant": name, **vars(parity(load_runner(path), reference, x, y)),
                         "max_abs_weight": int8_weight_bound(path), "kernels": ORT_KERNELS})
        with torch.no_grad():
            pt2e = quantize_pt2e(model, calibration)
            rows.append({"variant": "int8 PT2E (eager, reference kernels)",
                         **vars(parity(lambda a: pt2e(torch.from_numpy(a)).numpy(), reference, x, y)),
                         "kernels": "PyTorch fp32 ops (quantise/dequantise simulated)"})
        if args.aoti:
            compile_int8(model, calibration, folder / "int8.pt2")
            rows.append({"variant": "int8 PT2E + AOTInductor (oneDNN)",
                         **vars(parity(load_runner(folder / "int8.pt2"), reference, x, y)),
                         "kernels": "oneDNN int8 (follows ONEDNN_MAX_CPU_ISA)"})
    for row in rows:
        changed = round((1 - row["agreement"]) * len(x))
        bound = row.get("max_abs_weight", "")
        print(f"{row['variant']:36} {row['agreement']:>10.2%} {changed:>8} {row['accuracy']:>9.2%} {bound!s:>8}")
    fp32 = float((reference.argmax(1) == y).mean())
    path = write_record("int8-parity", {"tables": {"int8 parity": table_rows(rows, len(x))}, "digits": len(x),
                                        "goal_agreement": GOAL},
                        baseline={"variant": "fp32 (eager)", "accuracy": fp32})
    print(f"fp32 accuracy {fp32:.2%}; record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
