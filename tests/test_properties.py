"""Property tests of training/core/inputs/preprocess.py: whatever a client sends, the answer is a 28×28 digit or a
PreprocessError (which the handler turns into a 400), never another exception, a hang or a huge allocation.

Derandomized and database-free, so CI runs the same examples every time.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.core.inputs.preprocess import (
    MAX_PIXELS,
    MIN_SIDE,
    SIZE,
    PreprocessError,
    from_pixels,
    preprocess_bytes,
    to_mnist,
)

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None)
# PIL warns about big or odd headers on its way to refusing them; the tests check the refusal.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
LOSSLESS = (".png", ".bmp")
ENCODINGS = (".png", ".jpg", ".bmp", ".webp")  # the formats load_image accepts
OTHER_ENCODINGS = (".tiff", ".ppm")  # decodable by OpenCV, refused by load_image
MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a", b"II*\x00")


def digit_or_refusal(call, *args) -> np.ndarray | PreprocessError:
    """Run `call`; a result must be a 28×28 uint8 digit with ink, any failure a PreprocessError."""
    try:
        out = call(*args)
    except PreprocessError as err:
        assert str(err), "a PreprocessError must say why"
        event(f"refused: {str(err).split(':')[0]}")
        return err
    event("digit")
    assert isinstance(out, np.ndarray) and out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.max() > 0
    return out


def encode(image: np.ndarray, ext: str) -> bytes | None:
    try:
        ok, buffer = cv2.imencode(ext, image)
    except cv2.error:  # e.g. 4-channel JPEG: not something a client could send either
        return None
    return buffer.tobytes() if ok else None


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width×height pixels, followed by a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


images = st.tuples(st.integers(1, 200), st.integers(1, 200), st.sampled_from([1, 3, 4])).flatmap(
    lambda s: hnp.arrays(np.uint8, s[:2] if s[2] == 1 else s))


@st.composite
def drawings(draw, min_side: int = 1) -> np.ndarray:
    """Paper with a few strokes: images that get past the contrast check, unlike most arrays."""
    height, width = draw(st.integers(min_side, 200)), draw(st.integers(min_side, 200))
    paper, ink = draw(st.sampled_from([(255, 0), (0, 255), (200, 40)]))
    image = np.full((height, width), paper, np.uint8)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(0, 4))):
        points = rng.integers(0, [width, height], size=(2, 2))
        cv2.line(image, tuple(map(int, points[0])), tuple(map(int, points[1])), ink, int(rng.integers(1, 8)))
    channels = draw(st.sampled_from([1, 3, 4]))
    if channels == 1:
        return image
    image = np.repeat(image[:, :, None], channels, axis=2)
    if channels == 4:
        image[:, :, 3] = draw(st.sampled_from([255, 128, 0]))
    return image


# --- bytes → digit ---------------------------------------------------------------------------------

@settings(DETERMINISTIC, max_examples=500)
@given(st.one_of(st.binary(max_size=2048),
                 st.tuples(st.sampled_from(MAGICS), st.binary(max_size=2048)).map(b"".join)))
def test_arbitrary_bytes_are_a_digit_or_a_preprocess_error(data):
    digit_or_refusal(preprocess_bytes, data)


@settings(DETERMINISTIC, max_examples=150)
@given(st.one_of(images, drawings()), st.sampled_from(ENCODINGS + OTHER_ENCODINGS))
def test_encoded_images_are_a_digit_or_a_preprocess_error(image, ext):
    data = encode(image, ext)
    assume(data is not None)
    result = digit_or_refusal(preprocess_bytes, data)
    if ext in OTHER_ENCODINGS:
        assert isinstance(result, PreprocessError) and "format" in str(result)
    elif min(image.shape[:2]) < MIN_SIDE:
        assert isinstance(result, PreprocessError) and "too small" in str(result)
    elif ext in LOSSLESS and isinstance(result, np.ndarray):
        gray = image if image.ndim == 2 else None
        if gray is not None:  # the decoded pixels are the ones encoded: same answer as to_mnist
            assert np.array_equal(result, to_mnist(gray))


@settings(DETERMINISTIC, max_examples=300)
@given(drawings(min_side=MIN_SIDE), st.sampled_from(ENCODINGS), st.data())
def test_damaged_encodings_are_a_digit_or_a_preprocess_error(image, ext, data):
    """Real files with bytes changed or cut off past their header: the decoders' error paths."""
    encoded = encode(image, ext)
    assume(encoded is not None)
    damaged = bytearray(encoded)
    header = min(64, len(damaged) - 1)  # damage in the header mostly stops at "not an image"
    for _ in range(data.draw(st.integers(0, 4))):
        damaged[data.draw(st.integers(header, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(damaged)), st.integers(header, len(damaged))))
    digit_or_refusal(preprocess_bytes, bytes(damaged[:cut]))


@settings(DETERMINISTIC, max_examples=100)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_a_header_claiming_any_size_is_refused_without_decoding_it(width, height):
    # The pixel data is 64 bytes whatever the header claims: nothing of this size can decode.
    result = digit_or_refusal(preprocess_bytes, png_claiming(width, height))
    assert isinstance(result, PreprocessError)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    """12000×12000 black PNG, ~160 KB on disk, 144 MB of pixels: refused from its header, in a fresh
    process so its peak RSS shows whether the pixels were ever allocated. The same process then
    decodes it with OpenCV directly, which proves the measurement sees a decode."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(encode(np.zeros((12000, 12000), np.uint8), ".png"))
    assert bomb.stat().st_size < 200_000
    probe = textwrap.dedent(f"""
        import json, time
        import cv2, numpy as np
        from training.core.inputs.preprocess import PreprocessError, preprocess_bytes
        data = open({str(bomb)!r}, "rb").read()
        # VmHWM: this address space's peak RSS. (ru_maxrss would carry the parent's peak over exec.)
        peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
        before, start = peak(), time.perf_counter()
        try:
            preprocess_bytes(data)
            message = None
        except PreprocessError as err:
            message = str(err)
        seconds, refused = time.perf_counter() - start, peak()
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        print(json.dumps(dict(message=message, seconds=seconds, refused_growth=refused - before,
                              decode_growth=peak() - refused)))
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, timeout=120,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["message"] == f"image too large: 12000x12000 pixels (limit {MAX_PIXELS:,} pixels)"
    assert result["refused_growth"] < 20, result  # MiB; measured 1 (refused) against 276 (decoded)
    assert result["decode_growth"] > 100, result  # the control: a real decode is visible


def test_a_bigger_bomb_says_too_large():
    with pytest.raises(PreprocessError, match="image too large"):
        preprocess_bytes(png_claiming(20000, 20000))


# --- arrays → digit --------------------------------------------------------------------------------

@settings(DETERMINISTIC, max_examples=200)
@given(st.one_of(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=200)),
                 drawings().map(lambda a: a if a.ndim == 2 else a[:, :, 0])))
def test_any_2d_uint8_array_is_a_digit_or_a_preprocess_error(gray):
    result = digit_or_refusal(to_mnist, gray)
    # A digit made from a larger picture is MNIST-format: a second pass changes nothing. (A 28×28 input
    # is taken as MNIST-format already; noise on grey paper is stretched, and again on a second pass.)
    if isinstance(result, np.ndarray) and gray.shape != (SIZE, SIZE):
        assert np.array_equal(to_mnist(result), result)


@settings(DETERMINISTIC, max_examples=100)
@given(hnp.arrays(np.uint8, (SIZE, SIZE)))
def test_a_28x28_image_passes_through_with_its_polarity_fixed(gray):
    """MNIST-like (black paper, ink reaching 250, 10+ ink pixels once the polarity is fixed): unchanged.
    Anything else: refused as "no digit found", or brought to black paper and full-brightness ink."""
    def ring(image):
        return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])

    expected = 255 - gray if np.median(ring(gray)) > 127 else gray
    result = digit_or_refusal(to_mnist, gray)
    mnist_like = (np.median(ring(expected)) < 1 and expected.max() >= 250
                  and np.count_nonzero(expected > 0.15 * 255) >= 10)
    if mnist_like:
        assert np.array_equal(result, expected)
    elif isinstance(result, PreprocessError):
        assert str(result).startswith("no digit found: ")
    else:  # paper level subtracted, ink stretched to full brightness
        assert result.shape == (SIZE, SIZE) and result.max() == 255


@settings(DETERMINISTIC, max_examples=50)
@given(hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=4, max_side=30)))
def test_arrays_of_other_shapes_or_types_are_refused(array):
    assume(not (array.ndim == 2 and array.dtype == np.uint8))
    with pytest.raises(PreprocessError, match="expected a 2-D uint8 image"):
        to_mnist(array)


def test_an_empty_array_is_refused():
    with pytest.raises(PreprocessError):
        to_mnist(np.zeros((0, 5), np.uint8))


# --- JSON pixels → digit ---------------------------------------------------------------------------

# Integers up to ±2**1023 (the float range); beyond it, test_an_integer_beyond_float_range_is_refused.
json_scalars = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=5), st.integers(),
                         st.sampled_from([2**1023, -(2**1023), 10**300]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=30), st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_leaves=40)


@st.composite
def pixel_grids(draw) -> list:
    """Nearly 28×28 lists of numbers in and around 0..255, sometimes with one odd value in them."""
    shape = (draw(st.integers(27, 29)), draw(st.integers(27, 29)))
    grid = draw(hnp.arrays(np.float64, shape, elements=st.floats(-2, 260))).tolist()
    if draw(st.booleans()):
        grid[draw(st.integers(0, shape[0] - 1))][draw(st.integers(0, shape[1] - 1))] = draw(json_scalars)
    return grid


@settings(DETERMINISTIC, max_examples=300)
@given(st.one_of(json_values, pixel_grids()))
def test_any_json_value_as_pixels_is_uint8_28x28_or_a_preprocess_error(value):
    try:
        out = from_pixels(value)
    except PreprocessError as err:
        assert str(err)
        event(f"refused: {str(err).split(',')[0]}")
        return
    event("pixels")
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    # Accepted only when every value is a number in 0..255, and each pixel is that number to the
    # nearest integer: checked value by value, not by repeating from_pixels's array arithmetic.
    assert len(value) == SIZE
    for row, pixels in zip(value, out.tolist(), strict=True):
        assert len(row) == SIZE
        for number, pixel in zip(row, pixels, strict=True):
            assert isinstance(number, int | float) and 0 <= number <= 255, number
            assert abs(pixel - number) <= 0.5, (number, pixel)


# value in the JSON → the pixel it must become: exact integers stay, others round to the nearest, and
# halves to the even neighbour (NumPy's rint, the IEEE default), so 0.5 is black and 254.5 is not white.
KNOWN_PIXELS = {0: 0, 255: 255, 7: 7, 0.4: 0, 0.5: 0, 0.6: 1, 1.5: 2, 2.5: 2, 127.49: 127, 254.5: 254, 254.51: 255}


def test_json_pixels_become_known_uint8_values():
    values = list(KNOWN_PIXELS)
    grid = [[values[(r * SIZE + c) % len(values)] for c in range(SIZE)] for r in range(SIZE)]
    out = from_pixels(grid)
    assert out.tolist() == [[KNOWN_PIXELS[v] for v in row] for row in grid]


def test_an_integer_beyond_float_range_is_refused():
    with pytest.raises(PreprocessError):
        from_pixels(json.loads("[[1" + "0" * 400 + "]]"))
