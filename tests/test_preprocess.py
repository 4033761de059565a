"""training.core.inputs.preprocess: any digit picture → the 28×28 MNIST format, and the same tensor as training sees.

The pictures are drawn with numpy (axis-aligned strokes, so the expected boxes are exact) and encoded
with OpenCV; the parity test uses real MNIST test images.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from training.core.inputs.preprocess import (
    MNIST_MEAN,
    MNIST_STD,
    PreprocessError,
    bridge_size,
    from_pixels,
    load_image,
    preprocess_bytes,
    to_mnist,
)
from training.core.tensors import normalize

CENTRE = 14.0  # where MNIST's digits have their centre of mass, in pixel coordinates


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok, ext
    return buffer.tobytes()


def seven(height: int = 120, width: int = 100, top: int = 20, left: int = 30) -> np.ndarray:
    """Black ink on white paper: an 80×50 "7" (a bar on top, a stem on the right) at (top, left)."""
    paper = np.full((height, width), 255, np.uint8)
    paper[top : top + 12, left : left + 50] = 0
    paper[top : top + 80, left + 36 : left + 50] = 0
    return paper


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and header that claims width×height pixels, with no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def ink_box(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    weights = image.astype(np.float64)
    total = weights.sum()
    return (float(weights.sum(axis=1) @ np.arange(28)) / total, float(weights.sum(axis=0) @ np.arange(28)) / total)


@pytest.fixture(scope="module")
def expected_seven() -> np.ndarray:
    return preprocess_bytes(encode(seven()))


# --- from a picture to the MNIST format ---------------------------------------------------------


def test_dark_ink_on_light_paper_becomes_bright_ink_on_black(expected_seven):
    assert expected_seven.dtype == np.uint8 and expected_seven.shape == (28, 28)
    border = np.concatenate([expected_seven[0], expected_seven[-1], expected_seven[:, 0], expected_seven[:, -1]])
    assert not border.any()
    assert expected_seven.max() == 255
    # The same drawing already light-on-dark gives the identical result.
    assert np.array_equal(preprocess_bytes(encode(255 - seven())), expected_seven)


def test_the_longer_side_of_the_digit_is_scaled_to_20_pixels(expected_seven):
    assert ink_box(expected_seven) == (20, 12)  # 80×50 → 20×12.5, rounded to even
    bar = np.full((100, 150), 255, np.uint8)
    bar[40:70, 20:110] = 0  # a wide 30×90 stroke
    assert ink_box(preprocess_bytes(encode(bar))) == (7, 20)


def test_an_off_centre_digit_is_centred_by_its_centre_of_mass(expected_seven):
    corner = preprocess_bytes(encode(seven(height=300, width=300, top=210, left=240)))
    cy, cx = centre_of_mass(corner)
    assert abs(cy - CENTRE) <= 0.5 and abs(cx - CENTRE) <= 0.5
    assert np.array_equal(corner, expected_seven)  # where the digit sat on the paper does not matter


def test_transparent_background_is_composited_on_white(expected_seven):
    # Black everywhere, visible only where the "7" is: without compositing it would be a blank image.
    bgra = np.zeros((*seven().shape, 4), np.uint8)
    bgra[:, :, 3] = 255 - seven()
    assert np.array_equal(preprocess_bytes(encode(bgra)), expected_seven)


@pytest.mark.parametrize(
    ("ext", "convert"),
    [
        (".png", lambda gray: cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)),
        (".png", lambda gray: gray.astype(np.uint16) * 257),  # 16-bit
        (".bmp", lambda gray: gray),
        (".webp", lambda gray: gray),  # OpenCV writes lossless WebP by default
    ],
    ids=["rgb-png", "16bit-png", "bmp", "webp"],
)
def test_lossless_formats_give_the_same_digit_as_a_gray_png(ext, convert, expected_seven):
    assert np.array_equal(preprocess_bytes(encode(convert(seven()), ext)), expected_seven)


def test_jpeg_differs_from_the_lossless_digit_by_at_most_ringing(expected_seven):
    jpeg = preprocess_bytes(encode(seven(), ".jpg"))
    assert ink_box(jpeg) == (20, 12)
    assert np.abs(jpeg.astype(int) - expected_seven).max() <= 2


def test_a_28x28_mnist_style_image_only_has_its_polarity_fixed():
    digit = np.zeros((28, 28), np.uint8)
    digit[3:5, 20:26] = 255  # deliberately off-centre: MNIST-format input is not re-centred
    digit[5, 20:26] = 100
    assert np.array_equal(to_mnist(digit), digit)
    assert np.array_equal(to_mnist(255 - digit), digit)


def test_every_mnist_test_digit_passes_the_28x28_path_unchanged(mnist_test_images):
    images = mnist_test_images[0].numpy()
    assert all(np.array_equal(to_mnist(image), image) for image in images)


@pytest.mark.parametrize("paper", [255, 240, 220, 180])
@pytest.mark.parametrize("ink", [0, 60])
def test_a_28x28_digit_on_grey_paper_or_in_grey_ink_becomes_the_mnist_digit(mnist_test_images, paper, ink):
    """What phones and scanners send at 28×28: dark ink on off-white paper, faint ink. The paper level
    is taken out and the ink stretched, so the model sees the digit MNIST has (to rounding)."""
    digit = mnist_test_images[0][0].numpy()
    picture = np.rint(paper - (paper - ink) * (digit / 255.0)).astype(np.uint8)
    assert np.abs(to_mnist(picture).astype(int) - digit).max() <= 1
    faint = np.rint(digit * (120 / 255)).astype(np.uint8)  # light ink on black, at half brightness
    assert np.abs(to_mnist(faint).astype(int) - digit).max() <= 2


def test_a_dot_or_a_smudge_at_28x28_is_not_a_digit():
    dot = np.zeros((28, 28), np.uint8)
    dot[14, 14] = 255
    with pytest.raises(PreprocessError, match=r"^no digit found: too little ink"):
        to_mnist(dot)
    faint = np.zeros((28, 28), np.uint8)
    faint[8:20, 12:15] = 15  # a "1" barely above black: nothing stands out
    with pytest.raises(PreprocessError, match=r"^no digit found: the image has no contrast$"):
        to_mnist(faint)


@pytest.mark.parametrize(("shape", "bridge"), [((4000, 3000), 41), ((3000, 4000), 41), ((280, 280), 3),
                                                ((16000, 1000), 41), ((80000, 8), 1), ((100, 100), 1)])
def test_the_gap_bridging_kernel_follows_the_picture_but_not_a_strips_length(shape, bridge):
    # An 80,000×8 PNG of 1.5 KB had an 801-px kernel: a minute of one core per request.
    assert bridge_size(shape) == bridge


def test_a_page_of_dots_is_refused_not_joined_dot_by_dot():
    """A 188 KB PNG of 49×41,000 px, every other pixel a dot: ~500k marks, each a candidate part of the digit.
    Joining them one by one grew with the square of their number (minutes: the worker was killed); now
    the count is bounded and the picture refused. (Decoded, it is first shrunk to WORK_PIXELS, fewer marks.)"""
    page = np.full((49, 41_000), 255, np.uint8)
    page[1::2, 1::2] = 0
    with pytest.raises(PreprocessError, match=r"^too many separate marks of similar size \(492,000\): not one digit$"):
        to_mnist(page)
    with pytest.raises(PreprocessError, match=r"^too many separate marks of similar size \([\d,]+\): not one digit$"):
        preprocess_bytes(encode(page))


def test_a_digit_in_many_dots_is_still_read_as_one():
    """A dotted stroke (a few dozen marks) stays a digit: the bound is far above what a digit has."""
    dotted = np.zeros((280, 280), np.uint8)
    for row in range(40, 240, 12):  # a dotted "1": 17 dots in a column
        dotted[row : row + 6, 137:143] = 255
    digit = to_mnist(dotted)
    assert digit.shape == (28, 28) and digit.max() == 255


def test_light_ink_on_a_transparent_canvas_is_not_erased_by_white_paper(expected_seven):
    """A dark-themed drawing pad: white strokes, transparent elsewhere. Composited on white, the ink vanished."""
    bgra = np.zeros((*seven().shape, 4), np.uint8)
    bgra[:, :, :3] = 255
    bgra[:, :, 3] = 255 - seven()
    assert np.array_equal(preprocess_bytes(encode(bgra)), expected_seven)


def test_an_mnist_test_image_survives_png_and_normalizes_like_training(mnist_test_images):
    """Train/serve parity at the function level: bytes → preprocess → normalize is training's tensor."""
    images, _ = mnist_test_images
    for image in images[:1000]:
        served = preprocess_bytes(encode(image.numpy()))
        assert np.array_equal(served, image.numpy())
        assert torch.equal(normalize(served), normalize(image))


# --- refused inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(12_000, 12_000), (4001, 4000)])
def test_a_huge_image_is_refused_from_its_header_before_decoding(width, height, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(PreprocessError, match=f"^image too large: {width}x{height} pixels \\(limit 16,000,000"):
        load_image(png_header(width, height))


def test_an_image_at_the_pixel_limit_is_allowed_to_decode():
    # 4000×4000 is exactly the limit: it gets past the header check to the decoder (and has no pixels).
    with pytest.raises(PreprocessError, match=r"^could not decode the PNG image: truncated or corrupt$"):
        load_image(png_header(4000, 4000))


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (32, 32)).save(buffer, "GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input: expected image bytes"),
        (b"\x00garbage\xff" * 50, "not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes"),
        (encode(seven())[:60], "could not decode the PNG image: truncated or corrupt"),
        (encode(seven())[:-200], "could not decode the PNG image: truncated or corrupt"),
        (gif(), "unsupported image format GIF: expected PNG, JPEG, BMP, WebP or HEIC"),
        (encode(np.zeros((1, 1), np.uint8)), "image too small: 1x1 pixels (at least 8 per side)"),
        (encode(np.full((64, 64), 255, np.uint8)), "no digit found: the image has no contrast"),
        (encode(np.zeros((28, 28), np.uint8)), "no digit found: the image is blank"),
    ],
    ids=["empty", "garbage", "truncated-header", "truncated-pixels", "gif", "1x1", "blank", "blank-28x28"],
)
def test_bad_input_is_refused_with_a_clear_message(data, message):
    with pytest.raises(PreprocessError) as err:
        preprocess_bytes(data)
    assert str(err.value) == message


# --- JSON pixels --------------------------------------------------------------------------------


def test_from_pixels_accepts_28_rows_of_28_numbers_and_rounds():
    pixels = [[0] * 28 for _ in range(28)]
    pixels[3][4], pixels[5][6], pixels[7][8] = 255, 127.6, 0.4
    array = from_pixels(pixels)
    assert array.dtype == np.uint8 and array.shape == (28, 28)
    assert (array[3, 4], array[5, 6], array[7, 8]) == (255, 128, 0)
    assert int(array.sum()) == 255 + 128


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        ([[0] * 28] * 27, "pixels must have shape 28x28, got 27x28"),
        ([[[0]] * 28] * 28, "pixels must have shape 28x28, got 28x28x1"),
        (5, "pixels must have shape 28x28, got scalar"),
        ([[0] * 28] * 27 + [[0] * 27], "pixels must be 28 rows of 28 numbers"),  # ragged
        ([["a"] * 28] * 28, "pixels must be 28 rows of 28 numbers"),
        ([[256] * 28] * 28, "pixel values must be numbers in 0..255"),
        ([[-1] * 28] * 28, "pixel values must be numbers in 0..255"),
        ([[float("nan")] * 28] * 28, "pixel values must be numbers in 0..255"),
        ([[float("inf")] * 28] * 28, "pixel values must be numbers in 0..255"),
        ([[0.5] * 28] * 28, "pixel values must be in 0..255, these are all in 0..1: multiply them by 255"),
    ],
    ids=["27-rows", "3-d", "scalar", "ragged", "strings", "256", "negative", "nan", "inf", "fractions"],
)
def test_from_pixels_refuses_bad_arrays(pixels, message):
    with pytest.raises(PreprocessError) as err:
        from_pixels(pixels)
    assert str(err.value) == message


# --- normalisation ------------------------------------------------------------------------------


def test_normalize_gives_a_batch_of_one_channel_images():
    assert normalize(np.zeros((28, 28), np.uint8)).shape == (1, 1, 28, 28)
    batch = normalize(torch.zeros(7, 28, 28, dtype=torch.uint8))
    assert batch.shape == (7, 1, 28, 28) and batch.dtype == torch.float32


def test_normalize_maps_black_and_white_to_the_mnist_standard_scores():
    x = normalize(np.array([[0, 255] * 14] * 28, np.uint8))
    assert x[0, 0, 0, 0].item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)  # -0.42421
    assert x[0, 0, 0, 1].item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)  # 2.82157


def test_normalize_treats_arrays_and_tensors_alike():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    assert torch.equal(normalize(images), normalize(torch.from_numpy(images)))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((28, 28), np.float32), "expected uint8 pixels, got torch.float32"),
        (np.zeros((28, 28), np.int64), "expected uint8 pixels, got torch.int64"),
        (np.zeros((28, 27), np.uint8), "expected 28x28 images, got shape (28, 27)"),
        (np.zeros((2, 1, 28, 28), np.uint8), "expected 28x28 images, got shape (2, 1, 28, 28)"),
        (np.zeros(28 * 28, np.uint8), "expected 28x28 images, got shape (784,)"),
    ],
    ids=["float", "int64", "28x27", "4-d", "flat"],
)
def test_normalize_refuses_other_dtypes_and_shapes(images, message):
    with pytest.raises(PreprocessError) as err:
        normalize(images)
    assert str(err.value) == message


def test_the_polarity_test_is_numpys_median_of_the_border():
    # to_mnist's 28×28 path decides dark-on-light (and the paper level) by the border's median, from one sort.
    from training.core.inputs.preprocess import _twice_border_median

    rng = np.random.default_rng(0)
    for i in range(2000):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        levels = rng.integers(0, 256, (h, w)) if i % 2 else rng.choice([0, 127, 128, 255], (h, w))
        gray = levels.astype(np.uint8)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        assert _twice_border_median(gray) == 2 * np.median(border)
        for level in (126, 127, 128):
            assert (_twice_border_median(gray) > 2 * level) == (np.median(border) > level)
