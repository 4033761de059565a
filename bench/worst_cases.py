"""The most expensive images a client can send, one definition for the budget test (tests/test_budget.py)
and `make soak`: each at most MAX_REQUEST bytes, each either refused (a 400) or answered.

The corpus is the fixed regression set of the budget: the slowest inputs the property-based search of
tests/test_budget.py found, plus the worst case of each accepted format at its limits.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from serving.server import template_value

# TorchServe's max_request_size (configs/config.properties; its own default where unset): nothing larger
# reaches a worker.
MAX_REQUEST = int(template_value("max_request_size") or 6553500)
# Adam7's seven passes: (first row, first column, row step, column step)
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def digit_page(height: int, width: int, ink: int = 0, paper: int = 255) -> np.ndarray:
    """A page of `paper` with a thick handwritten-looking 7 in `ink`, scaled to the page."""
    page = np.full((height, width), paper, np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    thick = max(1, side // 16)
    points = [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]
    xy = [(left + round(x * side), top + round(y * side)) for x, y in points]
    cv2.polylines(page, [np.array(xy, np.int32)], False, int(ink), thick)
    return page


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(pixels: np.ndarray, colour: int, depth: int = 8, interlaced: bool = False, palette: bytes = b"",
        width: int | None = None) -> bytes:
    """A PNG written by hand: any colour type and depth, Adam7-interlaced or not (neither OpenCV nor PIL
    writes interlaced files). `pixels`: rows of samples, already packed (and `width` given) below 8 bits."""
    height, width = pixels.shape[0], width or pixels.shape[1]
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlaced))
    raw = pixels.astype(">u2") if depth == 16 else pixels.astype(np.uint8)
    rows = raw.reshape(height, -1).view(np.uint8)
    passes = [rows] if not interlaced else [_adam7_pass(raw, p) for p in ADAM7]
    stream = b"".join(np.hstack([np.zeros((len(p), 1), np.uint8), p]).tobytes() for p in passes if p.size)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + (png_chunk(b"PLTE", palette) if palette else b"")
            + png_chunk(b"IDAT", zlib.compress(stream, 9)) + png_chunk(b"IEND", b""))


def _adam7_pass(raw: np.ndarray, spec: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, dy, dx = spec  # pixels of 8-bit or wider samples only
    sub = raw[y0::dy, x0::dx]
    return sub.reshape(sub.shape[0], -1).view(np.uint8) if sub.size else np.zeros((0, 0), np.uint8)


def pil(image: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **options)
    return buffer.getvalue()


def exif_blob(entries: int) -> bytes:
    """A TIFF-structured EXIF block with `entries` IFD entries (the orientation among them)."""
    entries = min(entries, 5000)
    ifd = b"".join(struct.pack("<HHII", 0x0112 if i == entries - 1 else 0x9000 + i % 4000, 3, 1, 1)
                   for i in range(entries))
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + struct.pack("<H", entries) + ifd + b"\0\0\0\0"


def jpeg_with_app1(image: np.ndarray, blob: bytes) -> bytes:
    body = pil(image, "JPEG", quality=90)
    return body[:2] + b"\xff\xe1" + struct.pack(">H", len(blob) + 2) + blob + body[2:]


def _dots(height: int, width: int) -> np.ndarray:
    return _dots_every(height, width, 2)


def _dots_every(height: int, width: int, step: int) -> np.ndarray:
    page = np.full((height, width), 255, np.uint8)
    page[1::step, 1::step] = 0
    return page


CASES: dict[str, Callable[[], bytes]] = {
    "16-bit RGBA PNG, 4000x4000": lambda: png(np.dstack([np.repeat(digit_page(4000, 4000)[..., None], 3, 2),
                                                          np.full((4000, 4000), 255, np.uint8)]).astype(np.uint16)
                                              * 257, 6, 16),
    "grey PNG, 4000x4000 (the decode limit)": lambda: png(digit_page(4000, 4000), 0),
    "RGBA PNG, 2000x2000 (the decode limit)": lambda: png(np.dstack([np.repeat(digit_page(2000, 2000)[..., None],
                                                                                3, 2),
                                                                      np.full((2000, 2000), 255, np.uint8)]), 6),
    "interlaced grey PNG, 4000x4000": lambda: png(digit_page(4000, 4000), 0, interlaced=True),
    "1-bit PNG, 4000x4000": lambda: png(np.packbits(digit_page(4000, 4000) > 127, axis=1), 0, 1, width=4000),
    "palette PNG, 2000x2000": lambda: png(digit_page(2000, 2000) // 255, 3, palette=bytes(3) + b"\xff" * 3),
    "16-bit grey PNG, 2828x2828": lambda: png(digit_page(2828, 2828).astype(np.uint16) * 257, 0, 16),
    "PNG of dots, 49x41000": lambda: png(_dots(49, 41_000), 0),
    "PNG strip, 8x80000": lambda: png(digit_page(8, 80_000), 0),
    "PNG strip, 2000000x8": lambda: png(np.full((2_000_000, 8), 255, np.uint8), 0),
    "truncated grey PNG, 4000x4000": lambda: png(digit_page(4000, 4000), 0)[:20_000],
    "baseline JPEG, 4000x4000": lambda: pil(digit_page(4000, 4000), "JPEG", quality=75),
    "progressive JPEG, 4000x4000": lambda: pil(digit_page(4000, 4000), "JPEG", quality=75, progressive=True),
    "progressive colour JPEG, 2300x2300 (the decode limit)": lambda: pil(
        np.repeat(digit_page(2300, 2300)[..., None], 3, 2), "JPEG", quality=75, progressive=True),
    "JPEG with a 5000-entry EXIF block": lambda: jpeg_with_app1(digit_page(600, 600), exif_blob(5000)),
    "lossless WebP, 2000x2000": lambda: pil(digit_page(2000, 2000), "WEBP", lossless=True),
    "lossy WebP, 2300x2300": lambda: pil(np.repeat(digit_page(2300, 2300)[..., None], 3, 2), "WEBP", quality=50),
    "BMP, 1000x1000": lambda: pil(digit_page(1000, 1000), "BMP"),
    "HEIC, 2000x2000": lambda: pil(np.repeat(digit_page(2000, 2000)[..., None], 3, 2), "HEIF", quality=50),
    "HEIC, 1150x1150 (the decode limit)": lambda: pil(np.repeat(digit_page(1150, 1150)[..., None], 3, 2), "HEIF",
                                                      quality=50),
    # A phone's photo is read from its thumbnail (decode.py): the largest thumbnail within the limit.
    "HEIC, 4032x3024 with a 1300-px thumbnail": lambda: pil(np.repeat(digit_page(3024, 4032)[..., None], 3, 2),
                                                            "HEIF", quality=50, thumbnails=[1300]),
    "GIF, 4000x4000": lambda: pil(digit_page(4000, 4000), "GIF"),
    # The costliest the search of tests/test_budget.py found (BUDGET_EXAMPLES=400, AVX2-capped): ~90 ms.
    "interlaced grey PNG, 12649x1264": lambda: png(digit_page(12_649, 1264), 0, interlaced=True),
    "interlaced PNG of dots every 5 px, 12649x1264": lambda: png(_dots_every(12_649, 1264, 5), 0, interlaced=True),
}


def worst_cases(names: list[str] | None = None) -> dict[str, bytes]:
    """{name: bytes} of the corpus (or of `names`), each cut to MAX_REQUEST as the server would refuse it."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    out = {}
    for name in names or list(CASES):
        data = CASES[name]()
        if len(data) <= MAX_REQUEST:
            out[name] = data
    return out
