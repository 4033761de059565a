"""Image bytes → upright 2-D uint8 grayscale array, for the formats phones and browsers really send.

PNG, JPEG, BMP and WebP are decoded by OpenCV; MPO (the multi-picture JPEG many phone cameras
write) is read as its first frame, the picture itself; HEIC/HEIF (the iPhone camera's default) by
pillow-heif. The EXIF orientation tag is applied, so a portrait phone photo is not classified lying
on its side. Every format gets the same pixel-count limit, checked from the header before any
pixel is decoded. Packed into the `.mar` beside preprocess.py, so it imports nothing from the repository.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pillow_heif
from PIL import Image

MAX_PIXELS = 16_000_000  # ~16 MP: above this an image is refused before it is decoded
MIN_SIDE = 8
OPENCV_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "WEBP"}  # cv2.imdecode reads an MPO's first frame (a JPEG)
PIL_FORMATS = {"HEIF"}  # OpenCV has no HEIF decoder
FORMATS = OPENCV_FORMATS | PIL_FORMATS
ACCEPTED = "PNG, JPEG, BMP, WebP or HEIC"
ORIENTATION_TAG = 0x0112  # EXIF "Orientation": how the camera was held
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type → bit depths
# Chunks a PNG may carry before its pixels that change nothing here, with the least length PIL accepts.
# Any other (eXIf: the orientation; tRNS, text, animation...) sends the file through PIL's parser.
PNG_PLAIN_CHUNKS = {b"PLTE": 0, b"gAMA": 4, b"sRGB": 1, b"pHYs": 9, b"cHRM": 32}

# One decode thread per call: the server runs several workers and batches, not threads per image.
cv2.setNumThreads(1)
# HEIF files open through PIL like any other format. pillow-heif applies a HEIF's own rotation
# (irot/imir) while decoding and resets the EXIF orientation to 1, so it is never applied twice.
pillow_heif.register_heif_opener()


class PreprocessError(ValueError):
    """The input cannot be turned into a digit image; the message says why, for the client."""


def load_image(data: bytes) -> np.ndarray:
    """Decode image bytes to a 2-D uint8 grayscale array, upright, alpha composited on paper (`to_gray`)."""
    if not data:
        raise PreprocessError("empty input: expected image bytes")
    fmt, width, height, orientation = _read_header(data)
    if fmt not in FORMATS:
        raise PreprocessError(f"unsupported image format {fmt}: expected {ACCEPTED}")
    if width * height > MAX_PIXELS:
        raise PreprocessError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise PreprocessError(f"image too small: {width}x{height} pixels (at least {MIN_SIDE} per side)")
    image = _decode_opencv(data) if fmt in OPENCV_FORMATS else _decode_pil(data)
    if image is None or image.shape[:2] != (height, width):
        raise PreprocessError(f"could not decode the {fmt} image: truncated or corrupt")
    return orient(to_gray(image), orientation)


def _read_header(data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, EXIF orientation) from the header: PIL parses it without decoding pixels.

    So a decompression bomb, a small file that claims gigapixels, is refused before any memory is spent on it.
    """
    size = _plain_png_size(data)
    if size is not None:  # the common case, a canvas or screenshot PNG: a third of PIL's cost
        return "PNG", size[0], size[1], 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            with Image.open(io.BytesIO(data)) as header:
                fmt, (width, height) = header.format, header.size
                orientation = _orientation(header.info.get("exif"))
    except Image.DecompressionBombError:  # PIL's own limit (~179 MP), checked before ours
        raise PreprocessError(f"image too large: over {MAX_PIXELS:,} pixels") from None
    except Exception:  # PIL raises many types for unknown or broken headers
        raise PreprocessError(f"not an image: expected {ACCEPTED} bytes") from None
    return str(fmt), width, height, orientation if 1 <= orientation <= 8 else 1


def _plain_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG whose chunks before the pixels are all ones PIL would accept and that
    change nothing here (`PNG_PLAIN_CHUNKS`), every checksum verified as PIL verifies it; None for
    anything else, which `_read_header` then hands to PIL. So this path answers exactly as PIL would.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    view, pos, size = memoryview(data), len(PNG_SIGNATURE), None
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return None
        if kind == b"IDAT":
            return size
        if size is None:  # the first chunk must be the header
            if kind != b"IHDR" or length != 13:
                return None
            width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
                ">IIBBBBB", data, pos + 8)
            if depth not in PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
                return None
            size = width, height
        elif length < PNG_PLAIN_CHUNKS.get(kind, length + 1):  # not a plain chunk, or shorter than PIL takes
            return None
        pos = end
    return None


def _orientation(exif: bytes | None) -> int:
    # From the EXIF block the header parse already read: Image.getexif() would decode a PNG's pixels
    # to look for an eXIf chunk after them, which is what the header check is there to avoid.
    if not exif:
        return 1
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        return int(parsed.get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        return 1


def _decode_opencv(data: bytes) -> np.ndarray | None:
    # IMREAD_UNCHANGED keeps alpha and 16-bit depth, and ignores EXIF: `orient` applies it once.
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _decode_pil(data: bytes) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgba = np.asarray(image.convert("RGBA"))
    except Exception:  # a truncated or corrupt HEIF fails inside libheif with its own error types
        return None
    return np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])  # OpenCV's BGRA order, as to_gray expects


def to_gray(image: np.ndarray) -> np.ndarray:
    """A decoded image (gray, BGR or BGRA; 8 or 16 bits) → 2-D uint8 gray."""
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
        # Transparent pixels become white paper, as they look in a browser; but a drawing that is
        # mostly transparent with light ink (a dark-themed drawing pad) gets black paper, or its
        # ink would vanish into the white.
        opaque = float(alpha.sum())
        light_ink = opaque < 0.5 * alpha.size and float((gray * alpha).sum()) > 127.5 * opaque
        paper = 0.0 if light_ink else 255.0
        return np.rint(gray * alpha + paper * (1.0 - alpha)).astype(np.uint8)
    raise PreprocessError(f"unsupported number of channels: {channels}")


def orient(gray: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to the pixels, as PIL's ImageOps.exif_transpose does."""
    if orientation in (2, 4, 5, 7):  # the mirrored ones: undo the mirror first...
        gray = gray[:, ::-1]
    # ...then the rotation, counter-clockwise quarter turns: 3 and 4 are upside down, 6 and 7 were
    # shot with the phone turned clockwise (portrait on a landscape sensor), 8 and 5 anticlockwise.
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)
    return np.ascontiguousarray(np.rot90(gray, turns)) if turns or orientation != 1 else gray
