"""Edge first, server when unsure: `make bench-hybrid`, `python -m bench.hybrid`.

The edge answers from its ONNX model (by default the distilled student: the small model is the
point of an edge) and sends an image to TorchServe, serving CHECKPOINT, when its confidence is below
the threshold. For each threshold: the share answered locally, the accuracy of each path and overall,
on the 10k MNIST test images. Every forwarded image really goes to a live TorchServe (free loopback
ports) through the edge client's own `ask_server`, as a PNG. The images forwarded at the highest
threshold include those of every lower one, so each image is sent once and its answer reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from serving.archive import build_archive
from serving.server import TorchServe
from training.data import data_dir, load_split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "edge"))  # the edge client from the source tree, as pip would install it
from mnist_edge.cli import EdgeModel, ask_server  # noqa: E402

# The trained model uses label smoothing 0.1, so its top probability rarely passes ~0.92 (README).
THRESHOLDS = (0.5, 0.7, 0.8, 0.9)


def hybrid_table(confidence: np.ndarray, local: np.ndarray, server: dict[int, int], labels: np.ndarray,
                 thresholds: tuple[float, ...]) -> list[dict]:
    rows = []
    for t in thresholds:
        here = confidence >= t
        away = np.flatnonzero(~here)
        final = local.copy()
        final[away] = [server[i] for i in away]
        rows.append({"threshold": t, "local_share": float(here.mean()),
                     "local_accuracy": float((local[here] == labels[here]).mean()) if here.any() else None,
                     "server_accuracy": float((final[away] == labels[away]).mean()) if len(away) else None,
                     "forwarded": len(away), "overall_accuracy": float((final == labels).mean())})
    return rows


def markdown(rows: list[dict], edge_accuracy: float) -> str:
    lines = ["| threshold | answered on the edge | edge accuracy (its share) | server accuracy (forwarded) "
             "| requests to the server | overall accuracy |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        la = "" if r["local_accuracy"] is None else f"{r['local_accuracy']:.2%}"
        sa = "" if r["server_accuracy"] is None else f"{r['server_accuracy']:.2%}"
        lines.append(f"| {r['threshold']} | {r['local_share']:.2%} | {la} | {sa} | {r['forwarded']:,} | "
                     f"{r['overall_accuracy']:.2%} |")
    lines.append(f"| (edge alone) | 100.00% | {edge_accuracy:.2%} | | 0 | {edge_accuracy:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hybrid", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path, help="what the server serves")
    parser.add_argument("--edge-model", default=None, type=Path,
                        help="ONNX model on the edge (default: the student's, else artifacts/export/model.onnx)")
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    parser.add_argument("--limit", type=int, default=0, help="only the first N test images (0: all 10k)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="artifacts/bench/hybrid.json", type=Path)
    args = parser.parse_args(argv)
    edge_model = args.edge_model or next(p for p in (ROOT / "artifacts/export/student/model.onnx",
                                                      ROOT / "artifacts/export/model.onnx") if p.is_file())
    thresholds = tuple(sorted(float(t) for t in args.thresholds.split(",")))
    images, labels = load_split(data_dir(args.data_dir), train=False)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    images, labels = images.numpy(), labels.numpy()
    probs = np.concatenate([EdgeModel(edge_model).probabilities(images[i : i + 500])
                            for i in range(0, len(images), 500)])
    confidence, local = probs.max(1), probs.argmax(1)
    unsure = np.flatnonzero(confidence < thresholds[-1])
    with tempfile.TemporaryDirectory(prefix="mnist-hybrid-") as tmp:
        store = Path(tmp) / "store"
        build_archive(args.checkpoint, store, "mnist", "1.0")
        server = TorchServe.on_free_ports(Path(tmp) / "run", store, model_name="mnist", auth=True)
        try:
            server.start(timeout=300)
            url, token = server.url("inference"), server.token("inference")
            answers = {}
            for i in unsure:
                png = cv2.imencode(".png", images[i])[1].tobytes()
                answers[int(i)] = int(ask_server(url, png, "mnist", token)["digit"])
        finally:
            server.stop()
    rows = hybrid_table(confidence, local, answers, labels, thresholds)
    edge_accuracy = float((local == labels).mean())
    print(f"edge model {edge_model.relative_to(ROOT) if edge_model.is_relative_to(ROOT) else edge_model}; "
          f"server {args.checkpoint}; {len(labels):,} MNIST test images")
    print(markdown(rows, edge_accuracy))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"edge_model": str(edge_model), "server": str(args.checkpoint),
                                    "edge_accuracy": edge_accuracy, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
