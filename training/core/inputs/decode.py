"""Image bytes → upright 2-D uint8 grayscale array, for the formats phones and browsers really send.

PNG, JPEG, BMP and WebP are decoded by OpenCV; MPO (the multi-picture JPEG many phone cameras
write) is read as its first frame, the picture itself; HEIC/HEIF (the iPhone camera's default) by
pillow-heif. The EXIF orientation tag is applied, so a portrait phone photo is not classified lying
on its side. Every format gets the same pixel-count limit, checked from the header before any
pixel is decoded, and a limit on what the decoder must write (`decoded_bytes`), which is what a
request's CPU time and memory grow with. Large pictures are decoded small where the format allows
(JPEG at 1/2, 1/4 or 1/8 scale by libjpeg) and otherwise shrunk to WORK_PIXELS straight after decoding,
before any per-pixel float work. Packed into the `.mar` beside preprocess.py, so it imports nothing
from the repository.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import cv2
import numpy as np
import pillow_heif
from PIL import Image

MAX_PIXELS = 16_000_000  # ~16 MP: above this an image is refused before it is decoded
MIN_SIDE = 8
# What a decode may write before anything is shrunk: a 16 MP grey PNG, a 4 MP RGBA one, a 5 MP RGB WebP.
# Inflating and unfiltering a PNG costs ~4 ms of CPU per MB written here, so this bounds both a request's
# CPU time and its memory (a 16 MP 16-bit RGBA PNG would write 128 MB: ~1.5 s and ~500 MB).
MAX_DECODED_BYTES = 16_000_000
# Larger pictures are decoded or shrunk to about this many pixels: far more than a digit needs (it ends
# up 20 px tall) and every step after decoding costs in proportion to it.
WORK_PIXELS = 1_000_000
# A progressive JPEG is decoded scan by scan over a buffer of all its coefficients; each scan is a pass
# over that buffer. Encoders write about 10; thousands fit in a small file and cost seconds.
MAX_SCANS = 64
# A HEIC over the decode limit (a phone's 12 MP photo: HEVC costs ~30 ms per MP) is read from its embedded
# thumbnail instead, as a JPEG is read at reduced scale: iPhones write a 320×240 one, plenty for a digit.
THUMBNAIL_MIN_SIDE = 192
JPEG_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
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
    fmt, width, height, orientation, cost = _read_header(data)
    if fmt not in FORMATS:
        raise PreprocessError(f"unsupported image format {fmt}: expected {ACCEPTED}")
    if width * height > MAX_PIXELS:
        raise PreprocessError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise PreprocessError(f"image too small: {width}x{height} pixels (at least {MIN_SIDE} per side)")
    if cost > MAX_DECODED_BYTES and fmt == "HEIF" and (thumbnail := _heif_thumbnail(data)) is not None:
        return orient(to_gray(thumbnail), orientation)
    if cost > MAX_DECODED_BYTES:
        raise PreprocessError(f"image too large to decode: {width}x{height} {fmt} needs {cost / 1e6:.0f} MB "
                              f"decoded (limit {MAX_DECODED_BYTES / 1e6:.0f} MB); send it smaller or as a JPEG")
    reduction = jpeg_reduction(width, height) if fmt in ("JPEG", "MPO") else 1
    if reduction > 1:
        image = _decode_opencv(data, JPEG_REDUCED[reduction] | cv2.IMREAD_IGNORE_ORIENTATION)
    else:
        image = _decode_opencv(data) if fmt in OPENCV_FORMATS else _decode_pil(data)
    if image is None or image.shape[:2] != (-(-height // reduction), -(-width // reduction)):
        raise PreprocessError(f"could not decode the {fmt} image: truncated or corrupt")
    return orient(to_gray(shrink(image)), orientation)


def decoded_bytes(data: bytes, header: Image.Image | None, width: int, height: int) -> int:
    """Bytes the decoder writes before anything can be shrunk, from the header alone (`header`: PIL's
    parse of it; None for a plain PNG, whose header `_plain_png_size` read)."""
    fmt = "PNG" if header is None else header.format
    if fmt in ("JPEG", "MPO"):
        return _jpeg_decoded_bytes(data, header, width, height)
    if fmt == "PNG":  # OpenCV writes gray, BGR or BGRA (grey with alpha too), 1 or 2 bytes a sample
        depth, colour = data[24], data[25]  # IHDR, the first chunk
        alpha = colour in (4, 6) or data.find(b"tRNS", 0, max(0, data.find(b"IDAT"))) >= 0
        return width * height * (4 if alpha else 1 if colour == 0 else 3) * (2 if depth == 16 else 1)
    if fmt == "HEIF":  # libheif's planes, its RGB and PIL's RGBA copy; HEVC decoding costs ~30 ms per MP besides
        return width * height * 12
    return width * height * (3 if fmt == "WEBP" and header is not None and "A" not in header.mode else 4)


def jpeg_reduction(width: int, height: int) -> int:
    """The least of libjpeg's scales 1, 1/2, 1/4, 1/8 that brings the picture to WORK_PIXELS (or 1/8)."""
    return next((n for n in (1, 2, 4) if -(-width // n) * -(-height // n) <= WORK_PIXELS), 8)


def _jpeg_decoded_bytes(data: bytes, header: Image.Image | None, width: int, height: int) -> int:
    """What a JPEG decode holds: a baseline one, rows of its (reduced) output; a progressive one, every
    DCT coefficient (2 bytes each) of every component at full size whatever the output scale, with a pass
    over them per scan. PIL's parse says which (it skips junk between markers, as libjpeg does)."""
    if header is None or not header.info.get("progressive"):
        n = jpeg_reduction(width, height)
        return -(-width // n) * -(-height // n) * (3 if n == 1 else 1)
    # 0xFFDA starts a scan; entropy-coded data never holds it (an 0xFF there is followed by 0x00 or a restart).
    if (scans := data.count(b"\xff\xda")) > MAX_SCANS:
        raise PreprocessError(f"progressive JPEG with {scans} scans (at most {MAX_SCANS}): each is a pass over "
                              "the whole picture; send it as a baseline JPEG")
    sampling = [(h, v) for _, h, v, _ in getattr(header, "layer", [])]  # per component, from its frame header
    h_max, v_max = max([h for h, _ in sampling] + [1]), max([v for _, v in sampling] + [1])
    share = max(1.0, sum(h * v for h, v in sampling) / (h_max * v_max))
    return round(width * height * 2 * share)


def shrink(image: np.ndarray) -> np.ndarray:
    """A decoded picture over WORK_PIXELS → about WORK_PIXELS, by area averaging (any depth, any channels)."""
    height, width = image.shape[:2]
    if height * width <= WORK_PIXELS:
        return image
    f = math.sqrt(WORK_PIXELS / (height * width))
    return cv2.resize(image, (max(1, round(width * f)), max(1, round(height * f))), interpolation=cv2.INTER_AREA)


def _read_header(data: bytes) -> tuple[str, int, int, int, int]:
    """(format, width, height, EXIF orientation, `decoded_bytes`) from the header: PIL parses it without
    decoding pixels. So a decompression bomb, a small file that claims gigapixels, is refused before any
    memory is spent on it.
    """
    size = _plain_png_size(data)
    if size is not None:  # the common case, a canvas or screenshot PNG: a third of PIL's cost
        return "PNG", size[0], size[1], 1, decoded_bytes(data, None, *size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            with Image.open(io.BytesIO(data)) as header:
                fmt, (width, height) = header.format, header.size
                orientation = _orientation(header.info.get("exif"))
                cost = decoded_bytes(data, header, width, height) if fmt in FORMATS else 0
    except PreprocessError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit (~179 MP), checked before ours
        raise PreprocessError(f"image too large: over {MAX_PIXELS:,} pixels") from None
    except Exception:  # PIL raises many types for unknown or broken headers
        raise PreprocessError(f"not an image: expected {ACCEPTED} bytes") from None
    return str(fmt), width, height, orientation if 1 <= orientation <= 8 else 1, cost


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


def _decode_opencv(data: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    # IMREAD_UNCHANGED keeps alpha and 16-bit depth, and ignores EXIF: `orient` applies it once.
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def _decode_pil(data: bytes) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgba = np.asarray(image.convert("RGBA"))
    except Exception:  # a truncated or corrupt HEIF fails inside libheif with its own error types
        return None
    return np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])  # OpenCV's BGRA order, as to_gray expects


def _heif_thumbnail(data: bytes) -> np.ndarray | None:
    """The HEIC's embedded thumbnail, BGRA, where one is a scaled copy of the picture (pillow-heif's draft
    checks size, orientation and crop) at least THUMBNAIL_MIN_SIDE a side and itself within the limit."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.draft(None, (THUMBNAIL_MIN_SIDE, THUMBNAIL_MIN_SIDE)) is None:
                return None
            if decoded_bytes(data, image, *image.size) > MAX_DECODED_BYTES:
                return None
            rgba = np.asarray(image.convert("RGBA"))
    except Exception:  # libheif's own error types, as in _decode_pil
        return None
    return np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])


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
