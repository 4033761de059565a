"""Image bytes → MNIST-style 28×28 digit → normalised array. Shared verbatim by training, serving and edge/.

Training reads MNIST, which is already in the format `to_mnist` produces, and calls `normalize`
(training/tensors.py, the torch twin of `normalize_array`); the TorchServe handler calls
`load_image` → `to_mnist` → `normalize`. This file is packed into the `.mar` and into the torch-free
edge client (edge/), so it imports nothing from the rest of the repository and never imports torch.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SIZE = 28  # MNIST images are 28×28 ...
BOX = 20  # ... with the digit scaled to fit a 20×20 box inside them
MAX_PIXELS = 16_000_000  # ~16 MP: above this an image is refused before it is decoded
MIN_SIDE = 8
FORMATS = {"PNG", "JPEG", "BMP", "WEBP"}
INK_THRESHOLD = 0.15  # fraction of the brightest ink; fainter pixels (noise, JPEG ringing) are background

# One decode thread per call: the server runs several workers and batches, not threads per image.
cv2.setNumThreads(1)


class PreprocessError(ValueError):
    """The input cannot be turned into a digit image; the message says why, for the client."""


def load_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/BMP/WebP bytes to a 2-D uint8 grayscale array (alpha composited on white)."""
    if not data:
        raise PreprocessError("empty input: expected image bytes")
    # Read the header first (PIL parses it without decoding pixels), so a decompression bomb,
    # a small file that claims gigapixels, is refused before any memory is spent on it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            with Image.open(io.BytesIO(data)) as header:
                fmt, (width, height) = header.format, header.size
    except Image.DecompressionBombError:  # PIL's own limit (~179 MP), checked before ours
        raise PreprocessError(f"image too large: over {MAX_PIXELS:,} pixels") from None
    except Exception:  # PIL raises many types for unknown or broken headers
        raise PreprocessError("not an image: expected PNG, JPEG, BMP or WebP bytes") from None
    if fmt not in FORMATS:
        raise PreprocessError(f"unsupported image format {fmt}: expected PNG, JPEG, BMP or WebP")
    if width * height > MAX_PIXELS:
        raise PreprocessError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise PreprocessError(f"image too small: {width}x{height} pixels (at least {MIN_SIDE} per side)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.shape[:2] != (height, width):
        raise PreprocessError(f"could not decode the {fmt} image: truncated or corrupt")
    return _to_gray(image)


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise PreprocessError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        gray = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY).astype(np.float32)
        alpha = image[:, :, 3].astype(np.float32) / 255.0
        # Transparent pixels become white paper, as they look in a browser.
        return np.rint(gray * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    raise PreprocessError(f"unsupported number of channels: {channels}")


def from_pixels(pixels: object) -> np.ndarray:
    """Validate a JSON pixel array (28 rows of 28 values in 0..255) and return it as uint8."""
    try:
        array = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float range
        raise PreprocessError("pixels must be 28 rows of 28 numbers") from None
    if array.shape != (SIZE, SIZE):
        raise PreprocessError(f"pixels must have shape 28x28, got {'x'.join(map(str, array.shape)) or 'scalar'}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise PreprocessError("pixel values must be numbers in 0..255")
    return np.rint(array).astype(np.uint8)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Make any digit picture look like an MNIST digit: 28×28 uint8, bright ink on black.

    The MNIST procedure: ink bright on dark, crop to the ink, scale the longer side to 20 px
    keeping the aspect ratio, paste into 28×28 so the centre of mass sits at the centre.
    A 28×28 input is taken to be MNIST-format already and only has its polarity fixed, so MNIST
    images pass through unchanged (that is what makes training and serving see the same tensor).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise PreprocessError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if gray.size == 0:
        raise PreprocessError("empty image: no pixels")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = int(np.median(border))
    if background > 127:  # dark ink on light paper: MNIST is the other way round
        gray = 255 - gray
        background = 255 - background
    if gray.shape == (SIZE, SIZE):
        if gray.max() == 0:
            raise PreprocessError("no digit found: the image is blank")
        return np.ascontiguousarray(gray)

    ink = gray.astype(np.float32) - background
    np.clip(ink, 0, None, out=ink)
    peak = float(ink.max())
    if peak < 16:  # no stroke stands out from the paper
        raise PreprocessError("no digit found: the image has no contrast")
    ink *= 255.0 / peak
    rows = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = digit.shape
    scale = BOX / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    digit = cv2.resize(digit, (new_w, new_h), interpolation=interpolation)

    # Centre of mass → image centre, clamped so the whole digit stays inside the 28×28 field.
    total = float(digit.sum())
    cy = float((digit.sum(axis=1) * np.arange(new_h)).sum()) / total
    cx = float((digit.sum(axis=0) * np.arange(new_w)).sum()) / total
    top = min(max(round(SIZE / 2 - 0.5 - cy), 0), SIZE - new_h)
    left = min(max(round(SIZE / 2 - 0.5 - cx), 0), SIZE - new_w)
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + new_h, left : left + new_w] = digit
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def normalize_array(images: np.ndarray) -> np.ndarray:
    """uint8 images (28×28 or N×28×28) → float32 (N, 1, 28, 28) with MNIST mean/std, without torch.

    Bit-identical to training/tensors.py's `normalize` (float32 divide, subtract, divide in the same
    order; tests check all 256 pixel values), so the ONNX model on the edge sees training's numbers.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise PreprocessError(f"expected uint8 pixels, got {x.dtype}")
    if x.shape[-2:] != (SIZE, SIZE) or x.ndim not in (2, 3):
        raise PreprocessError(f"expected 28x28 images, got shape {tuple(x.shape)}")
    x = x.reshape(-1, 1, SIZE, SIZE).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)


def preprocess_bytes(data: bytes) -> np.ndarray:
    """The serving path for one encoded image: bytes → 28×28 uint8 MNIST-style digit."""
    return to_mnist(load_image(data))
