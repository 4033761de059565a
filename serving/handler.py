"""TorchServe handler: request → 28×28 digit → batched CNN → JSON, with per-request 400s for bad input.

The model class and the preprocessing are the training code itself (`training/model.py` and
`training/preprocess.py`), packed into the `.mar` beside this file.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

# Serve the code the archive was built with, even where another `training` is importable.
_HERE = Path(__file__).resolve().parent
if (_HERE / "training").is_dir() and str(_HERE) not in sys.path[:1]:
    sys.path.insert(0, str(_HERE))

from training.ensemble import load_ensemble  # noqa: E402
from training.model import build_model  # noqa: E402
from training.preprocess import PreprocessError, from_pixels, normalize, preprocess_bytes, to_mnist  # noqa: E402

logger = logging.getLogger(__name__)

# Load-time transforms of the eager model, chosen per archive (`make archive ARGS="--variant ..."`).
VARIANTS = ("eager", "fused", "int8")
# fused (batch norm folded into the convs) is the fastest at equal test accuracy: README, Benchmarks.
# The one default: serving/archive.py writes it into model.json, and an archive without one gets it too.
DEFAULT_VARIANT = "fused"


def optimize(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Apply the archive's load-time variant to the eval-mode model (see serving/archive.py)."""
    if variant == "fused":  # fold each batch norm into the conv before it: one op fewer per block
        for block in model.features:
            if isinstance(block[1], torch.nn.BatchNorm2d):
                block[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(block[0], block[1])
                block[1] = torch.nn.Identity()
    elif variant == "int8":  # dynamic int8 quantisation of the fully connected layers
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif variant != "eager":
        raise ValueError(f"unknown model variant {variant!r}")
    return model


def serving_model(model: torch.nn.Module, variant: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model as a worker runs it: eval mode, the archive's variant, channels_last, on `device`.

    channels_last: oneDNN's convolutions run faster in it on CPU (README, Benchmarks). Inputs
    must be channels_last too (`to_model_input`). Benchmarks and fault scripts call this as well, so
    their offline answers are computed exactly the way the server computes them.
    """
    return optimize(model.eval(), variant).to(device, memory_format=torch.channels_last)


def to_model_input(digits: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """28×28 uint8 digits → the normalised, channels_last batch `serving_model` expects."""
    return normalize(digits).to(device).contiguous(memory_format=torch.channels_last)


def decode_request(request: dict[str, Any]) -> np.ndarray:
    """One request of a batch → a 28×28 uint8 digit, or PreprocessError saying what is wrong with it.

    Accepted: raw image bytes (body), multipart field `data` or `file`, JSON {"data": base64 image}
    or JSON {"pixels": 28×28 values in 0..255}.
    """
    value = next((request[k] for k in ("data", "body", "file") if request.get(k) is not None), None)
    if value is None:  # also what a form-urlencoded body of non-form bytes turns into
        raise PreprocessError("no image found: send raw bytes as application/octet-stream or image/*, "
                              "a multipart field 'data' or 'file', or JSON")
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)) and value.lstrip()[:1] in (b"{", b"["):
        try:
            value = json.loads(value)
        except (UnicodeDecodeError, ValueError):
            raise PreprocessError("malformed JSON body") from None
    if isinstance(value, dict):
        return _decode_json(value)
    if isinstance(value, list):
        raise PreprocessError("JSON body must be an object with 'data' or 'pixels'")
    if isinstance(value, (bytes, bytearray)):
        return preprocess_bytes(bytes(value))
    raise PreprocessError("JSON body must be an object with 'data' or 'pixels'")


def _decode_json(body: dict[str, Any]) -> np.ndarray:
    if "pixels" in body:
        return to_mnist(from_pixels(body["pixels"]))
    if "data" in body:
        if not isinstance(body["data"], str):
            raise PreprocessError("'data' must be a base64-encoded image string")
        try:
            raw = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, ValueError):
            raise PreprocessError("'data' is not valid base64") from None
        return preprocess_bytes(raw)
    raise PreprocessError("JSON body must have 'data' (base64 image) or 'pixels' (28x28 array of 0..255)")


def error_body(message: str, code: int = 400) -> bytes:
    """TorchServe's own error shape, so clients parse one format whatever failed."""
    kind = "InvalidInput" if code < 500 else "InternalServerException"
    return json.dumps({"code": code, "type": kind, "message": message}).encode()


def prediction_body(probabilities: list[float], classes: list[str]) -> bytes:
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return json.dumps({
        "digit": int(classes[best]),
        "confidence": round(probabilities[best], 6),
        "probabilities": {c: round(p, 6) for c, p in zip(classes, probabilities, strict=True)},
    }).encode()


class MNISTHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties.get("model_dir") or _HERE)
        meta = json.loads((model_dir / "model.json").read_text())
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        if self.device.type == "cpu":
            # One intra-op thread per worker: TorchServe scales with workers and batches; several
            # threads per worker would fight the other workers and the Java frontend for the cores.
            torch.set_num_threads(int(os.environ.get("MNIST_WORKER_THREADS", "1")))
        serialized = (context.manifest or {}).get("model", {}).get("serializedFile", "weights.pt")
        state_dict = torch.load(model_dir / serialized, map_location="cpu", weights_only=True)
        variant = meta.get("variant", DEFAULT_VARIANT)
        if "ensemble" in meta:  # N members, one batched forward, averaged probabilities: training/ensemble.py
            self.model = load_ensemble(state_dict, meta, lambda m: serving_model(m, variant)).to(self.device)
        else:
            model = build_model(meta["model_config"])
            model.load_state_dict(state_dict)
            self.model = serving_model(model, variant, self.device)
        self.classes = meta["class_names"]
        self.batch_size = int(properties.get("batch_size") or 1)
        with torch.inference_mode():  # warm-up: first-call allocations happen here, not on a request
            self.model(to_model_input(torch.zeros(self.batch_size, 28, 28, dtype=torch.uint8), self.device))
        self.context = context
        self.initialized = True
        logger.info("MNIST model loaded on %s (batch size %d)", self.device, self.batch_size)

    def handle(self, data: list[dict[str, Any]], context) -> list[bytes]:
        """Decode each request on its own, run the good ones as one batch, answer each in order."""
        start = time.perf_counter()
        digits: list[np.ndarray] = []
        good: list[int] = []
        responses: list[bytes] = [b""] * len(data)
        for i, request in enumerate(data):
            try:
                digits.append(decode_request(request))
                good.append(i)
            except PreprocessError as err:
                context.set_response_status(400, "Bad Request", i)
                responses[i] = error_body(str(err))
            except Exception:  # a decoding bug must fail only its own request, not the batch
                logger.exception("request %d of the batch could not be decoded", i)
                context.set_response_status(500, "Internal Server Error", i)
                responses[i] = error_body("could not decode the request", 500)
            context.set_response_content_type(i, "application/json")
        decoded = time.perf_counter()
        predicted: list[int] = []
        if digits:
            with torch.inference_mode():
                x = to_model_input(np.stack(digits), self.device)
                probabilities = torch.softmax(self.model(x).float(), dim=1)
                predicted = probabilities.argmax(1).tolist()
                probabilities = probabilities.cpu().tolist()
            for i, probs in zip(good, probabilities, strict=True):
                responses[i] = prediction_body(probs, self.classes)
        self._record_metrics(context, decoded - start, time.perf_counter() - decoded,
                             rejected=len(data) - len(good), predicted=predicted)
        return responses

    def _record_metrics(self, context, preprocess_s: float, inference_s: float, rejected: int,
                        predicted: list[int]) -> None:
        # Per batch, not per request: each metric is a log line the frontend has to parse.
        metrics = context.metrics
        metrics.add_time("MNISTPreprocessTime", preprocess_s * 1000, None, "ms")
        if predicted:
            metrics.add_time("MNISTInferenceTime", inference_s * 1000, None, "ms")
        if rejected:
            metrics.add_counter("MNISTRejectedRequests", rejected)
        for digit in sorted(set(predicted)):
            metrics.add_counter("MNISTPredictions", predicted.count(digit), None,
                                [Dimension("Digit", self.classes[digit])])
