"""`mnist-edge predict IMAGE`: read a digit on this device; with --server, ask TorchServe when unsure.

The local answer is the exported ONNX model run by ONNX Runtime on the preprocessing the server
uses (preprocess.py is training/core/inputs/preprocess.py itself). Its confidence is calibrated as the server's
is: softmax(logits / T), with the temperature T fitted after training and carried in the ONNX file's
metadata by `make export` (a file without one: T = 1, and a note on stderr says so). Hybrid mode
answers locally when that confidence is at least --threshold and otherwise sends the image to the
server, whose answer then wins; if the server cannot be reached the local answer is returned, marked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

try:  # installed: the wheel carries training/core/inputs/ as mnist_edge.inputs
    from mnist_edge.inputs.preprocess import PreprocessError, normalize_array, preprocess_bytes
except ImportError:  # run from a checkout of the repository: the same files, where they live
    from training.core.inputs.preprocess import PreprocessError, normalize_array, preprocess_bytes

DEFAULT_MODEL = "artifacts/export/model.onnx"
# The metadata key training/tools/export.py writes (TEMPERATURE_KEY there; this package cannot import training).
TEMPERATURE_KEY = "temperature"
CLASSES = [str(d) for d in range(10)]


class EdgeError(RuntimeError):
    """The model or the server cannot be used; the message says which and why."""


class EdgeModel:
    """The ONNX model with one ONNX Runtime thread: a phone-sized budget, and predictable latency."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise EdgeError(f"no model at {path}: run `make export` (or pass --model)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.temperature, self.note = model_temperature(self.session.get_modelmeta().custom_metadata_map, path)

    def probabilities(self, digits: np.ndarray) -> np.ndarray:
        """28×28 uint8 digits (one or a batch) → (N, 10) calibrated probabilities: softmax(logits / T)."""
        logits = self.session.run(None, {self.input: normalize_array(digits)})[0] / self.temperature
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def model_temperature(metadata: dict[str, str], path: str | os.PathLike) -> tuple[float, str | None]:
    """(T, note): the temperature in the model's metadata, or 1.0 and a note saying why it is missing."""
    if TEMPERATURE_KEY not in metadata:
        return 1.0, (f"{path} carries no temperature (exported from an uncalibrated checkpoint or before "
                     "`make export` stored one): the confidence is the raw softmax (T = 1), not the calibrated one")
    try:
        temperature = float(metadata[TEMPERATURE_KEY])
    except ValueError:
        raise EdgeError(f"{path}: temperature {metadata[TEMPERATURE_KEY]!r} is not a number") from None
    if not 0.0 < temperature < float("inf"):
        raise EdgeError(f"{path}: temperature {temperature} must be positive and finite")
    return temperature, None


def answer(probabilities: np.ndarray, source: str) -> dict:
    best = int(probabilities.argmax())
    return {"digit": best, "confidence": round(float(probabilities[best]), 6), "source": source,
            "probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, probabilities, strict=True)}}


def ask_server(url: str, data: bytes, model_name: str = "mnist", token: str | None = None,
               timeout: float = 10.0) -> dict:
    """POST the original image bytes to TorchServe's inference API and return its JSON answer."""
    request = urllib.request.Request(f"{url.rstrip('/')}/predictions/{model_name}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise EdgeError(f"server answered {err.code}: {err.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise EdgeError(f"server {url} unreachable: {err}") from None


def predict(data: bytes, model: EdgeModel, server: str | None = None, threshold: float = 0.0,
            token: str | None = None, model_name: str = "mnist") -> dict:
    """One image: the local answer if it is confident enough (or there is no server), else the server's."""
    probabilities = model.probabilities(preprocess_bytes(data))[0]
    local = answer(probabilities, "edge")
    if server is None or float(probabilities.max()) >= threshold:  # unrounded: the bench compares the same
        return local
    try:
        remote = ask_server(server, data, model_name, token)
    except EdgeError as err:
        return {**local, "source": "edge (server failed)", "server_error": str(err)}
    return {**remote, "source": "server", "edge": {"digit": local["digit"], "confidence": local["confidence"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-edge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="read the digit in IMAGE (PNG, JPEG, BMP, WebP)")
    p.add_argument("image", type=Path)
    p.add_argument("--model", default=os.environ.get("MNIST_EDGE_MODEL", DEFAULT_MODEL),
                   help=f"ONNX model (default: $MNIST_EDGE_MODEL or {DEFAULT_MODEL})")
    p.add_argument("--server", default=None, help="TorchServe inference URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--threshold", type=float, default=0.8, help="answer locally at or above this confidence")
    p.add_argument("--token", default=os.environ.get("MNIST_EDGE_TOKEN"),
                   help="inference token for --server (default: $MNIST_EDGE_TOKEN)")
    p.add_argument("--model-name", default="mnist")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be in [0, 1]")
    try:
        data = args.image.read_bytes()
        model = EdgeModel(args.model)
        result = predict(data, model, args.server, args.threshold, args.token, args.model_name)
    except (OSError, PreprocessError, EdgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if model.note:  # with the answer it qualifies, on stderr: stdout stays one JSON object
        print(f"note: {model.note}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
