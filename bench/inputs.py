"""The bad-request corpus, one definition for the live tests (tests/test_serving.py) and `make chaos`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class BadInput:
    body: bytes
    content_type: str
    status: int | None  # what the server answers; None where TorchServe's frontend varies (form parsing)
    message: str = ""  # the start of the handler's 400 message


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _png(image: np.ndarray, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, image)[1].tobytes()


def bad_inputs(png: bytes) -> dict[str, BadInput]:
    """Requests a client might get wrong, or an attacker might try; `png` is a valid digit image."""
    boundary = "chaos-boundary"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="7.png"\r\n\r\n').encode() \
        + png + f"\r\n--{boundary}--\r\n".encode()
    bomb = _png(np.zeros((12000, 12000), np.uint8))  # 144 MB of pixels in ~140 KB
    octet, as_json = "application/octet-stream", "application/json"
    return {
        "empty body": BadInput(b"", octet, 400, "empty input"),
        "random bytes (4 KiB)": BadInput(np.random.default_rng(0).bytes(4096), octet, 400, "not an image"),
        "truncated PNG": BadInput(png[: len(png) // 2], "image/png", 400, "could not decode the PNG"),
        "text": BadInput(b"seven", "text/plain", 400, "not an image"),
        "malformed JSON": BadInput(b'{"data": ', as_json, 400, "malformed JSON body"),
        "bad base64": BadInput(_json({"data": "not base64!"}), as_json, 400, "'data' is not valid base64"),
        "JSON without an image": BadInput(_json({"image": "7.png"}), as_json, 400, "JSON body must have 'data'"),
        "wrong pixel shape (27x28)": BadInput(_json({"pixels": [[0] * 28] * 27}), as_json, 400,
                                              "pixels must have shape 28x28, got 27x28"),
        "blank pixels": BadInput(_json({"pixels": [[0] * 28] * 28}), as_json, 400, "no digit found"),
        "pixel value 300": BadInput(_json({"pixels": [[300] * 28] * 28}), as_json, 400,
                                    "pixel values must be numbers in 0..255"),
        "pixel value 1e400 (integer)": BadInput(b'{"pixels": [[1' + b"0" * 400 + b"]]}", as_json, 400,
                                                "pixels must be 28 rows of 28 numbers"),
        "1x1 PNG": BadInput(_png(np.full((1, 1), 255, np.uint8)), "image/png", 400, "image too small: 1x1"),
        "TIFF image": BadInput(_png(np.full((28, 28), 255, np.uint8), ".tiff"), "image/tiff", 400,
                               "unsupported image format TIFF"),
        f"12000x12000 PNG ({len(bomb) // 1000} KB)": BadInput(bomb, "image/png", 400, "image too large"),
        "form without an image": BadInput(b"digit=7", "application/x-www-form-urlencoded", 400, "no image found"),
        "multipart without data/file": BadInput(form, f"multipart/form-data; boundary={boundary}", 400,
                                                "no image found"),
        # Not the handler's: the frontend refuses the body (413, or a reset connection) or parses it as a form.
        "body over max_request_size (1 MiB + 1)": BadInput(b"\0" * (2**20 + 1), octet, 413),
        "PNG as form-urlencoded": BadInput(png, "application/x-www-form-urlencoded", None),
        # The handler reads the bytes, not the header: a mislabelled PNG is still a PNG.
        "PNG as application/json": BadInput(png, as_json, 200),
        "PNG as text/plain": BadInput(png, "text/plain", 200),
    }


def handler_rejections(png: bytes) -> dict[str, BadInput]:
    """The corpus entries the handler itself answers with a 400 and a message."""
    return {name: bad for name, bad in bad_inputs(png).items() if bad.status == 400}
