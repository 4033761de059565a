"""The pictures the digit page shows: the 28×28 the model saw and the explanation's heatmap, as data URLs."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import cv2
import numpy as np

from training.core.inputs.preprocess import SIZE, PreprocessError


def strip_data_url(body: bytes) -> bytes:
    """`data:image/png;base64,...` (what canvas.toDataURL and some clipboards give) → the image bytes.

    TorchServe's handler wants the bytes themselves, so the backend unwraps a data URL here and
    always forwards plain bytes as application/octet-stream.
    """
    if not body.startswith(b"data:"):
        return body
    header, sep, payload = body.partition(b",")
    if not sep or not header.endswith(b";base64"):
        raise PreprocessError("a data URL must be base64-encoded: data:image/...;base64,...")
    try:
        return base64.b64decode(b"".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PreprocessError("the data URL's base64 is not valid") from None


def png_data_url(image: np.ndarray) -> str:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buffer.tobytes()).decode()


def find_attribution_map(answer: dict[str, Any]) -> tuple[str, np.ndarray] | None:
    """The 28×28 attribution map in an /explanations answer, whatever its field is called, or None.

    Found by shape, at the top level or one object down ({"explanation": {"attributions": ...}}),
    so the page works with whichever layout the server's /explanations settles on.
    """
    for key, value in answer.items():
        if isinstance(value, dict) and (inner := find_attribution_map(value)) is not None:
            return key, inner[1]
        if isinstance(value, list) and len(value) == SIZE:
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if array.shape == (SIZE, SIZE) and np.isfinite(array).all():
                return key, array
    return None


def heatmap_png(attributions: np.ndarray) -> str:
    """Attributions → a 28×28 RGBA PNG to lay over the input: red supports the answer, blue opposes it."""
    scale = float(np.abs(attributions).max()) or 1.0
    strength = np.clip(attributions / scale, -1.0, 1.0)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)  # OpenCV's channel order: B, G, R, A
    rgba[..., 2] = np.where(strength > 0, 255, 0)
    rgba[..., 0] = np.where(strength < 0, 255, 0)
    rgba[..., 3] = np.rint(np.abs(strength) * 220).astype(np.uint8)
    return png_data_url(rgba)
