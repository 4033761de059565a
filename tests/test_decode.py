"""training.decode: what phones and browsers send → an upright gray array, every format under one pixel limit.

Pictures are asymmetric on purpose (a bar in the top-left corner), so a wrong or missing rotation
cannot pass. Lossless encodings are compared exactly; lossy ones (JPEG, HEIC) by where the bar is.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import training.decode as decode
from training.decode import ORIENTATION_TAG, PreprocessError, load_image, orient
from training.wild import unorient


def upright() -> np.ndarray:
    """64×48 white page, a black 8×24 bar at its top-left: where the bar is shows which way is up."""
    page = np.full((64, 48), 255, np.uint8)
    page[4:12, 4:28] = 0
    return page


def bar_corner(gray: np.ndarray) -> tuple[int, int]:
    """(row, column) of the dark bar's top-left corner."""
    rows, cols = np.nonzero(gray < 128)
    return int(rows.min()), int(cols.min())


def encode_pil(image: np.ndarray, fmt: str, orientation: int | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        options["exif"] = exif.tobytes()
    Image.fromarray(image).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation):
    stored = np.arange(35, dtype=np.uint8).reshape(5, 7)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[ORIENTATION_TAG] = orientation
    image.info["exif"] = exif.tobytes()
    assert np.array_equal(orient(stored, orientation), np.asarray(ImageOps.exif_transpose(image)))
    assert np.array_equal(orient(unorient(stored, orientation), orientation), stored)  # the wild set's inverse


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True})], ids=["png", "webp"])
def test_exif_orientation_is_applied_to_lossless_images_exactly(fmt, options, orientation):
    data = encode_pil(unorient(upright(), orientation), fmt, orientation, **options)
    assert np.array_equal(load_image(data), upright())


@pytest.mark.parametrize("orientation", [3, 6, 8, 2, 5])
def test_a_phone_jpeg_is_turned_upright(orientation):
    data = encode_pil(unorient(upright(), orientation), "JPEG", orientation, quality=95)
    gray = load_image(data)
    assert gray.shape == (64, 48)
    assert bar_corner(gray) == (4, 4)


def test_a_jpeg_without_exif_is_left_as_stored():
    stored = unorient(upright(), 6)
    assert load_image(encode_pil(stored, "JPEG", quality=95)).shape == (48, 64)


def test_mpo_is_read_as_its_first_frame():
    first, second = upright(), 255 - upright()
    data = io.BytesIO()
    Image.fromarray(unorient(first, 6)).save(data, "MPO", save_all=True, append_images=[Image.fromarray(second)],
                                             exif=_exif(6), quality=95)
    assert Image.open(io.BytesIO(data.getvalue())).format == "MPO"
    gray = load_image(data.getvalue())
    assert gray.shape == (64, 48) and bar_corner(gray) == (4, 4)
    assert gray[40, 40] > 200  # white paper: the first frame, not the inverted second one


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def test_heic_is_decoded_upright():
    data = encode_pil(upright(), "HEIF", quality=95)
    assert Image.open(io.BytesIO(data)).format == "HEIF"
    gray = load_image(data)
    assert gray.shape == (64, 48) and bar_corner(gray) == (4, 4)
    assert np.abs(gray.astype(int) - upright()).mean() < 3  # lossy, but the same picture


def test_heic_with_an_orientation_is_turned_upright_once():
    # pillow-heif stores the EXIF orientation as the HEIF's own rotation and applies it when decoding.
    data = encode_pil(unorient(upright(), 6), "HEIF", 6, quality=95)
    gray = load_image(data)
    assert gray.shape == (64, 48) and bar_corner(gray) == (4, 4)


def test_heic_over_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    def no_decoding(data):
        raise AssertionError("the HEIC was decoded")

    monkeypatch.setattr(decode, "MAX_PIXELS", 64 * 48 - 1)
    monkeypatch.setattr(decode, "_decode_pil", no_decoding)
    with pytest.raises(PreprocessError) as err:
        load_image(encode_pil(upright(), "HEIF"))
    assert str(err.value) == "image too large: 48x64 pixels (limit 3,071 pixels)"


def test_truncated_heic_is_refused():
    data = encode_pil(upright(), "HEIF")
    with pytest.raises(PreprocessError) as err:
        load_image(data[: len(data) - 40])
    assert str(err.value) == "could not decode the HEIF image: truncated or corrupt"


def test_a_broken_orientation_value_is_ignored():
    assert np.array_equal(load_image(encode_pil(upright(), "PNG", 9)), upright())
