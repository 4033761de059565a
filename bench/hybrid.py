"""Edge first, server when unsure: `make bench-hybrid`, `python -m bench.hybrid`.

The edge answers from its ONNX model (by default the distilled student if there is one, else the
int8 ONNX of the default model: the small model is the point of an edge) and sends an image to
TorchServe, serving CHECKPOINT, when its calibrated confidence, softmax(logits / T) with the
temperature the ONNX file carries (`make export`), is below the threshold: the very `EdgeModel` and
`ask_server` of `mnist-edge`. For each threshold: the share answered locally, the accuracy of each
path and overall, on the 10k MNIST test images and on the wild set (training/tools/wild.py: each test
digit rendered as browsers and phones send it), each forwarded image sent to a live TorchServe on
free loopback ports. The images forwarded at the highest threshold include those of every lower
one, so each is sent once and its answer reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from bench.record import markdown_tables, write_record
from bench.report import machine_line
from serving.archive import build_archive
from serving.server import TorchServe
from training.data import data_dir, load_split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "edge"))  # the edge client from the source tree, as pip would install it
from mnist_edge.cli import EdgeError, EdgeModel, ask_server  # noqa: E402

from training.core.inputs.preprocess import PreprocessError, preprocess_bytes  # noqa: E402  (the edge runs this very code)

# Calibrated confidences (T ≈ 0.47 for the default model) mean what they say: at 0.9 the edge's own
# answers are right ~99.9% of the time on MNIST. 0.8 is mnist-edge's default --threshold.
THRESHOLDS = (0.5, 0.8, 0.9, 0.99, 0.999)
EDGE_MODELS = ("artifacts/export/student/model.onnx", "artifacts/export/model_int8.onnx", "artifacts/export/model.onnx")
REFUSED = -1  # the edge could not read the image, or the server gave no digit: a wrong answer


def hybrid_table(confidence: np.ndarray, local: np.ndarray, server: dict[int, int], labels: np.ndarray,
                 thresholds: tuple[float, ...]) -> list[dict]:
    """One row per threshold; `server` holds the server's answer for every image below the highest one."""
    rows = []
    for t in thresholds:
        here = confidence >= t
        away = np.flatnonzero(~here)
        final = local.copy()
        final[away] = [server[int(i)] for i in away]
        rows.append({"threshold": t, "local_share": float(here.mean()),
                     "local_accuracy": float((local[here] == labels[here]).mean()) if here.any() else None,
                     "server_accuracy": float((final[away] == labels[away]).mean()) if len(away) else None,
                     "forwarded": len(away), "overall_accuracy": float((final == labels).mean())})
    return rows


def markdown(tables: dict[str, dict]) -> str:
    lines = ["| set | threshold | answered on the edge | edge accuracy (its share) | server accuracy (forwarded) "
             "| requests to the server | overall accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, table in tables.items():
        for r in table["rows"]:
            la = "" if r["local_accuracy"] is None else f"{r['local_accuracy']:.2%}"
            sa = "" if r["server_accuracy"] is None else f"{r['server_accuracy']:.2%}"
            lines.append(f"| {name} | {r['threshold']} | {r['local_share']:.2%} | {la} | {sa} | {r['forwarded']:,} | "
                         f"{r['overall_accuracy']:.2%} |")
        edge = table["edge_accuracy"]
        lines.append(f"| {name} | (edge alone) | 100.00% | {edge:.2%} | | 0 | {edge:.2%} |")
    return "\n".join(lines)


def edge_pass(model: EdgeModel, digits: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated confidence, local answer) per image; an image the edge refused gets (0, REFUSED), so
    it goes to the server at every threshold above 0."""
    read = [i for i, d in enumerate(digits) if d is not None]
    confidence, local = np.zeros(len(digits)), np.full(len(digits), REFUSED)
    for start in range(0, len(read), 500):
        idx = read[start : start + 500]
        probs = model.probabilities(np.stack([digits[i] for i in idx]))  # type: ignore[misc]
        confidence[idx], local[idx] = probs.max(1), probs.argmax(1)
    return confidence, local


def mnist_set(images: np.ndarray) -> tuple[list[np.ndarray | None], Callable[[int], bytes]]:
    # A 28×28 PNG decodes to its own pixels (preprocess_bytes is the identity there), so the edge
    # reads the arrays directly; the server gets the PNG.
    return list(images), lambda i: cv2.imencode(".png", images[i])[1].tobytes()


def wild_set(images: np.ndarray, seed: int) -> tuple[list[np.ndarray | None], Callable[[int], bytes], list[str]]:
    """Every transform of training/tools/wild.py over `images`, in order: what the edge reads, and (re-rendered,
    deterministic) the bytes to send. The data-URL transform's JSON wrapper is a browser's; the edge and
    the server both get the image inside it, as the mnist-edge CLI sends the file it read."""
    from bench.eval_wild import _image_bytes
    from training.tools.wild import TRANSFORMS, render

    names = list(TRANSFORMS)

    def payload(k: int) -> bytes:
        i = k % len(images)
        return _image_bytes(render(names[k // len(images)], images[i], i, seed))

    digits: list[np.ndarray | None] = []
    for k in range(len(names) * len(images)):
        try:
            digits.append(preprocess_bytes(payload(k)))
        except PreprocessError:
            digits.append(None)
    return digits, payload, names


def load_wild(images: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> tuple[tuple | None, str]:
    """(the wild set as main uses it, or None; one line saying what it is or why it is absent)."""
    if not limit:
        return None, "wild set: left out (--wild-limit 0)"
    try:
        digits, payload, names = wild_set(images[:limit], seed)
    except ImportError as err:  # training/tools/wild.py (or its HEIC encoder) is not in this tree
        return None, f"wild set: ABSENT ({err}), so the table is MNIST only"
    return ((digits, payload, np.tile(labels[:limit], len(names))),
            f"wild set: {len(names)} transforms × {min(limit, len(images)):,} test digits")


def ask_all(url: str, token: str | None, payload: Callable[[int], bytes], indices: np.ndarray,
            threads: int) -> tuple[dict[int, int], int]:
    """The server's digit for each index (REFUSED where it gave none) and how many requests failed."""
    def one(i: int) -> int:
        try:
            return int(ask_server(url, payload(i), "mnist", token, timeout=60)["digit"])
        except (EdgeError, KeyError, TypeError, ValueError):
            return REFUSED

    with ThreadPoolExecutor(threads) as pool:  # a few at once: the server batches them (model-config.yaml)
        answers = dict(zip((int(i) for i in indices), pool.map(one, (int(i) for i in indices)), strict=True))
    return answers, sum(a == REFUSED for a in answers.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hybrid", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path, help="what the server serves")
    parser.add_argument("--edge-model", default=None, type=Path,
                        help=f"ONNX model on the edge (default: the first of {', '.join(EDGE_MODELS)})")
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    parser.add_argument("--limit", type=int, default=0, help="only the first N test images (0: all 10k)")
    parser.add_argument("--wild-limit", type=int, default=1000,
                        help="the wild set: the first N test digits in every transform (0: no wild set)")
    parser.add_argument("--seed", type=int, default=0, help="the wild set's seed (as make eval-wild)")
    parser.add_argument("--threads", type=int, default=4, help="requests in flight to the server")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="artifacts/bench/hybrid.json", type=Path)
    args = parser.parse_args(argv)
    edge_path = args.edge_model or next((ROOT / p for p in EDGE_MODELS if (ROOT / p).is_file()), None)
    if edge_path is None:
        print("error: no edge model: run `make export` (or `make distill`), or pass --edge-model", file=sys.stderr)
        return 1
    thresholds = tuple(sorted(float(t) for t in args.thresholds.split(",")))
    model = EdgeModel(edge_path)
    images, labels = load_split(data_dir(args.data_dir), train=False)
    images, labels = images.numpy(), labels.numpy()
    mnist = (images[: args.limit], labels[: args.limit]) if args.limit else (images, labels)
    sets: dict[str, tuple] = {"MNIST test": (*mnist_set(mnist[0]), mnist[1])}
    wild, wild_note = load_wild(images, labels, args.wild_limit, args.seed)
    if wild is not None:
        sets["wild"] = wild
    tables: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mnist-hybrid-") as tmp:
        store = Path(tmp) / "store"
        build_archive(args.checkpoint, store, "mnist", "1.0")
        server = TorchServe.on_free_ports(Path(tmp) / "run", store, model_name="mnist", auth=True)
        try:
            server.start(timeout=300)
            url, token = server.url("inference"), server.token("inference")
            for name, (digits, payload, truth) in sets.items():
                confidence, local = edge_pass(model, digits)
                unsure = np.flatnonzero(confidence < thresholds[-1])
                answers, failed = ask_all(url, token, payload, unsure, args.threads)
                tables[name] = {"images": len(truth), "edge_refused": int((local == REFUSED).sum()),
                                "server_failed": failed, "edge_accuracy": float((local == truth).mean()),
                                "rows": hybrid_table(confidence, local, answers, truth, thresholds)}
                print(f"{name}: {len(truth):,} images, {len(unsure):,} sent to the server, edge refused "
                      f"{tables[name]['edge_refused']}, server failed {failed}", flush=True)
        finally:
            server.stop()
    shown = edge_path.resolve().relative_to(ROOT) if edge_path.resolve().is_relative_to(ROOT) else edge_path
    calibration = (f"temperature {model.temperature:.4f} from its metadata" if model.note is None
                   else f"NO temperature: {model.note}")
    print(f"\n{machine_line()}\nedge model {shown} ({calibration}); server {args.checkpoint} "
          f"(TorchServe, loopback); {wild_note}\n")
    print(markdown(tables))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"edge_model": str(edge_path), "server": str(args.checkpoint),
                                    "temperature": model.temperature, "temperature_note": model.note,
                                    "wild": wild_note, "sets": tables}, indent=2) + "\n")
    record = write_record("bench-hybrid", {"tables": {"hybrid": markdown_tables(markdown(tables))[0]}, "sets": tables,
                                           "edge_model": str(shown), "temperature": model.temperature},
                          baseline={"rows": "(edge alone), same run"})
    print(f"record: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
