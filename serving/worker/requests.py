"""One request of a batch → a 28×28 digit (or a PreprocessError saying what is wrong), and the answer's JSON.

Accepted: raw image bytes, multipart fields `data`/`file`, JSON {"data": base64 image} or
{"pixels": 28×28 values in 0..255}; the KServe v2 body is serving/worker/oip.py's.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from serving.worker.json_body import parse_json
from training.core.explain import IG_STEPS
from training.core.inputs.preprocess import PreprocessError, from_pixels, preprocess_bytes, to_mnist


def decode_request(request: dict[str, Any]) -> np.ndarray:
    """One request of a batch → a 28×28 uint8 digit, or PreprocessError saying what is wrong with it.

    Accepted: raw image bytes (body), multipart field `data` or `file`, JSON {"data": base64 image}
    or JSON {"pixels": 28×28 values in 0..255}. The base64 may be a data URL, line-wrapped or urlsafe.
    """
    value = next((request[k] for k in ("data", "body", "file") if request.get(k) is not None), None)
    if value is None:  # also what a form-urlencoded body of non-form bytes turns into
        raise PreprocessError("no image found: send raw bytes as application/octet-stream or image/*, "
                              "a multipart field 'data' or 'file', or JSON")
    if isinstance(value, str):
        value = value.encode()
    text = b""
    if isinstance(value, (bytes, bytearray)):
        # A text body may start with a UTF-8 byte-order mark or blank space (no image format does).
        text = bytes(value).removeprefix(b"\xef\xbb\xbf").lstrip()
        if text[:1] in (b"{", b"["):
            value = parse_json(text)
    if isinstance(value, dict):
        return _decode_json(value)
    if isinstance(value, list):
        raise PreprocessError("JSON body must be an object with 'data' or 'pixels'")
    if isinstance(value, (bytes, bytearray)):
        if text[:5].lower() == b"data:":  # a data URL sent as the body itself
            return preprocess_bytes(_base64_image(text.decode("ascii", "replace")))
        return preprocess_bytes(bytes(value))
    raise PreprocessError("JSON body must be an object with 'data' or 'pixels'")


def _base64_image(text: str) -> bytes:
    """Base64 image text → bytes. Takes what clients send: a data URL (`canvas.toDataURL()`), lines
    wrapped by the `base64` tool or a mail client, the urlsafe alphabet and missing padding."""
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise PreprocessError("'data' URL must be base64-encoded: data:image/...;base64,...")
        if not header[5:].lower().startswith("image/"):
            raise PreprocessError(f"'data' URL is not an image: {header[5:].split(';')[0] or 'no media type'}")
    text = "".join(text.split())  # spaces and line breaks anywhere
    if "-" in text or "_" in text:  # the urlsafe alphabet (RFC 4648 §5)
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PreprocessError("'data' is not valid base64") from None


def _decode_json(body: dict[str, Any]) -> np.ndarray:
    if "pixels" in body:
        return to_mnist(from_pixels(body["pixels"]))
    if "data" in body:
        if not isinstance(body["data"], str):
            raise PreprocessError("'data' must be a base64-encoded image string")
        return preprocess_bytes(_base64_image(body["data"]))
    raise PreprocessError("JSON body must have 'data' (base64 image) or 'pixels' (28x28 array of 0..255)")


def error_body(message: str, code: int = 400) -> bytes:
    """TorchServe's own error shape, so clients parse one format whatever failed."""
    kind = "InvalidInput" if code < 500 else "InternalServerException"
    return json.dumps({"code": code, "type": kind, "message": message}).encode()


def prediction_body(probabilities: list[float], classes: list[str], digit_like: bool = True,
                    attributions: list[list[float]] | None = None) -> bytes:
    """The answer: `digit` stays for clients that read only that; `is_digit` says whether to trust it at all."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    body: dict[str, Any] = {
        "digit": int(classes[best]),
        "confidence": round(probabilities[best], 6),
        "probabilities": {c: round(p, 6) for c, p in zip(classes, probabilities, strict=True)},
        "is_digit": bool(digit_like),
    }
    if attributions is not None:
        body["explanation"] = {"method": "integrated_gradients", "baseline": "black", "steps": IG_STEPS,
                               "target": int(classes[best]), "attributions": attributions}
    return json.dumps(body).encode()


def wants_explanation(context, index: int) -> bool:
    """The frontend sets `explain: True` on /explanations requests (ts BaseHandler._is_explain reads it
    for request 0 only; here each request of a mixed batch is asked on its own)."""
    return context.get_request_header(index, "explain") == "True"
