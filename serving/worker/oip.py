"""Open Inference Protocol (KServe v2) for the MNIST handler: a v2 request in, a v2 response or error out.

KServe's TorchServe runtime forwards `POST /v2/models/mnist/infer` bodies to TorchServe, and TorchServe's
own frontend serves the same route; the body tells them apart from this project's JSON, so one handler
answers both protocols, batched together. Why not TorchServe's `service_envelope=kservev2` (0.12): it
parses only the first request of a batch and returns one response for all of them (so batchSize must
be 1), names every output after an input (no room for `probabilities` and `digit`), and cannot return
a 400 (a handler error body becomes a 500). See README, "Scaling out".

Accepted, one digit per request (the server batches requests, not tensors):
  {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["<base64 PNG/JPEG>"]}]}
  {"inputs": [{"name": "input-0", "shape": [1, 28, 28], "datatype": "UINT8", "data": [784 values]}]}
`data` may be flat or nested, as the protocol allows. Answered with outputs `probabilities` (FP32,
[1, 10]), `digit` (INT64, [1]) and `is_digit` (BOOL, [1]: the OOD detector's verdict); a bad request
with HTTP 400 and `{"error": "..."}`, a body that claims to be one (an object with "inputs") but is
not JSON or nests too deeply included.
The KServe predictor (serving/predictor/) answers the same contract with this module, from the same
archive; over gRPC and the binary-data extension, BYTES data arrives as the image's raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from serving.worker.json_body import parse_json
from training.core.inputs.preprocess import PreprocessError, from_pixels, preprocess_bytes, to_mnist


class V2RequestError(PreprocessError):
    """A body that claims to be a v2 request but cannot be parsed: answered in the v2 error shape."""


def v2_body(request: dict[str, Any]) -> dict[str, Any] | None:
    """The v2 inference request in one TorchServe request of a batch, or None if it is not one.

    The body arrives as bytes (this project's server sets TS_DECODE_INPUT_REQUEST=false) or already
    parsed from JSON (TorchServe's default, as in KServe's runtime). Bytes are parsed with the depth
    bound of every JSON body; V2RequestError where that refuses them.
    """
    value = request.get("body") if request.get("data") is None else request.get("data")
    if isinstance(value, (bytes, bytearray)):
        if value.lstrip()[:1] != b"{" or b'"inputs"' not in value:
            return None
        try:
            value = parse_json(bytes(value))
        except PreprocessError as err:
            raise V2RequestError(str(err)) from None
    return value if isinstance(value, dict) and "inputs" in value else None


def decode(body: dict[str, Any]) -> np.ndarray:
    """A v2 request body → one 28×28 uint8 digit, or PreprocessError saying what is wrong."""
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise PreprocessError("'inputs' must hold exactly one tensor (one digit per request)")
    tensor = inputs[0]
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise PreprocessError("'shape' must be a list of non-negative integers")
    if datatype == "BYTES":
        if shape not in ([1], [1, 1]):
            raise PreprocessError(f"BYTES input must have shape [1] (one image), got {shape}")
        item = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else np.asarray([data])
        if item.size == 1 and isinstance(item[0], (bytes, bytearray)):  # gRPC or binary data: the image itself
            return preprocess_bytes(bytes(item[0]))
        if item.size != 1 or not isinstance(item[0], str):
            raise PreprocessError("BYTES data must be one base64-encoded image string")
        try:
            raw = base64.b64decode(item[0], validate=True)
        except (binascii.Error, ValueError):
            raise PreprocessError("BYTES data is not valid base64") from None
        return preprocess_bytes(raw)
    if datatype == "UINT8":
        if shape not in ([28, 28], [1, 28, 28], [1, 1, 28, 28]):
            raise PreprocessError(f"UINT8 input must have shape [1, 28, 28], got {shape}")
        try:
            flat = np.asarray(data, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise PreprocessError("UINT8 data must be 784 numbers in 0..255") from None
        if flat.size != 784:
            raise PreprocessError(f"UINT8 data must hold 784 values for shape {shape}, got {flat.size}")
        if not np.all(flat == np.rint(flat)):
            raise PreprocessError("UINT8 data must be integers in 0..255")
        return to_mnist(from_pixels(flat.reshape(28, 28)))
    raise PreprocessError(f"unsupported datatype {datatype!r}: send BYTES (a base64 image) or UINT8 (28x28 pixels)")


def outputs(probabilities: list[float], classes: list[str], digit_like: bool) -> list[dict[str, Any]]:
    """The answer's output tensors, one digit: what both servers send, in this order."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return [
        {"name": "probabilities", "shape": [1, len(probabilities)], "datatype": "FP32",
         "data": [round(p, 6) for p in probabilities]},
        {"name": "digit", "shape": [1], "datatype": "INT64", "data": [int(classes[best])]},
        {"name": "is_digit", "shape": [1], "datatype": "BOOL", "data": [bool(digit_like)]},
    ]


def response_body(body: dict[str, Any], probabilities: list[float], classes: list[str], digit_like: bool,
                  model_name: str, model_version: str, request_id: str) -> bytes:
    """The v2 response: `outputs`, and the request's id, or TorchServe's request id when it sent none
    (clients, KServe's wrapper among them, may read `id` unconditionally)."""
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    response["id"] = body["id"] if isinstance(body.get("id"), str) else request_id
    response["outputs"] = outputs(probabilities, classes, digit_like)
    return json.dumps(response).encode()


def error_body(message: str) -> bytes:
    """The protocol's error object; the HTTP status (400, 500) carries the kind."""
    return json.dumps({"error": message}).encode()
