"""training/core/inputs/decode.py: what phones and browsers send → an upright gray array, every format under
one pixel limit.

Pictures are asymmetric on purpose (a bar in the top-left corner), so a wrong or missing rotation
cannot pass. Lossless encodings are compared exactly; lossy ones (JPEG, HEIC) by where the bar is.
"""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import training.core.inputs.decode as decode
from training.core.inputs.decode import ORIENTATION_TAG, PreprocessError, load_image, orient
from training.tools.wild import unorient


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


def phone_heic(orientation: int | None = None, thumbnails: tuple[int, ...] = (320,)) -> bytes:
    """upright() at 1600×1200, over the HEIC decode limit, with the thumbnail a phone writes."""
    page = cv2.resize(upright(), (1200, 1600), interpolation=cv2.INTER_NEAREST)
    page = unorient(page, orientation) if orientation else page
    return encode_pil(page, "HEIF", orientation, quality=90, thumbnails=list(thumbnails))


@pytest.mark.parametrize("orientation", [None, 6])
def test_a_phone_heic_over_the_decode_limit_is_read_from_its_thumbnail(monkeypatch, orientation):
    monkeypatch.setattr(decode, "_decode_pil", lambda data: pytest.fail("the full HEIC was decoded"))
    gray = load_image(phone_heic(orientation))
    assert gray.shape == (320, 240) and bar_corner(gray) == (20, 20)  # the 4-px margin, scaled by 5


def test_a_heic_over_the_decode_limit_without_a_thumbnail_is_refused():
    with pytest.raises(PreprocessError) as err:
        load_image(phone_heic(thumbnails=()))
    assert str(err.value).startswith("image too large to decode: 1200x1600 HEIF needs 23 MB decoded")


def test_truncated_heic_is_refused():
    data = encode_pil(upright(), "HEIF")
    with pytest.raises(PreprocessError) as err:
        load_image(data[: len(data) - 40])
    assert str(err.value) == "could not decode the HEIF image: truncated or corrupt"


def test_a_broken_orientation_value_is_ignored():
    assert np.array_equal(load_image(encode_pil(upright(), "PNG", 9)), upright())


# --- the PNG header fast path ----------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def with_ihdr_byte(png: bytes, offset: int, value: int) -> bytes:
    """`png` with one byte of its IHDR body changed (8 bit depth, 9 colour type, 10 compression, 11 filter
    method, 12 interlace), its checksum recomputed: a valid chunk with other contents."""
    body = bytearray(png[16:29])
    body[offset] = value
    return png[:8] + png_chunk(b"IHDR", bytes(body)) + png[33:]


def with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """`png` with one more chunk right after IHDR (signature 8 bytes + IHDR 25)."""
    return png[:33] + png_chunk(kind, body) + png[33:]


def pil_header(data: bytes) -> tuple[str, int, int, int] | str:
    """What `_read_header` answered before the fast path (its first four fields): PIL's parse, or a refusal."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            exif = image.info.get("exif")
            return str(image.format), *image.size, decode._orientation(exif)
    except Exception:
        return "refused"


def plain_pngs() -> dict[str, bytes]:
    gray, rng = upright(), np.random.default_rng(0)
    colour = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    return {
        "opencv gray": cv2.imencode(".png", gray)[1].tobytes(),
        "opencv bgr": cv2.imencode(".png", colour)[1].tobytes(),
        "opencv bgra": cv2.imencode(".png", np.dstack([colour, colour[:, :, :1]]))[1].tobytes(),
        "opencv 16-bit": cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(),
        "pil gray": encode_pil(gray, "PNG"),
        "pil palette": _palette_png(gray),
        "pil with dpi (pHYs)": encode_pil(gray, "PNG", dpi=(96, 96)),
        "interlaced": with_ihdr_byte(encode_pil(gray, "PNG"), 12, 1),  # PIL writes no Adam7; pixels not read here
        "with gAMA, sRGB and cHRM": with_chunk(with_chunk(with_chunk(
            encode_pil(gray, "PNG"), b"gAMA", (45455).to_bytes(4, "big")), b"sRGB", b"\0"), b"cHRM", bytes(32)),
    }


def _palette_png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).convert("P").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(plain_pngs()))
def test_plain_pngs_take_the_fast_path_and_answer_as_pil_does(name):
    data = plain_pngs()[name]
    assert decode._plain_png_size(data) is not None
    assert decode._read_header(data)[:4] == pil_header(data)


@pytest.mark.parametrize("change", ["exif", "text", "trns", "bad crc", "short gama", "no idat", "ihdr not first",
                                    "bad depth", "filter method"])
def test_other_pngs_go_through_pil(change):
    png = encode_pil(upright(), "PNG")
    data = {
        "exif": encode_pil(unorient(upright(), 6), "PNG", 6),
        "text": with_chunk(png, b"tEXt", b"Comment\0hello"),
        "trns": with_chunk(png, b"tRNS", b"\0\0"),
        "bad crc": png[:29] + bytes(4) + png[33:],
        "short gama": with_chunk(png, b"gAMA", b"\0\0"),
        "no idat": png[:33],
        "ihdr not first": png[:8] + png_chunk(b"sRGB", b"\0") + png[8:],
        "bad depth": with_ihdr_byte(png, 8, 3),  # 3-bit grey does not exist
        "filter method": with_ihdr_byte(png, 11, 1),
    }[change]
    assert decode._plain_png_size(data) is None
    expected = pil_header(data)
    if expected == "refused":
        with pytest.raises(PreprocessError, match=r"^not an image"):
            decode._read_header(data)
    else:
        assert decode._read_header(data)[:4] == expected
    if change == "exif":
        assert np.array_equal(load_image(data), upright())  # the orientation still applies


def test_a_corrupt_header_checksum_is_refused_as_before():
    png = encode_pil(upright(), "PNG")
    with pytest.raises(PreprocessError, match=r"^not an image"):
        load_image(png[:29] + bytes(4) + png[33:])


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_large_phone_jpeg_is_decoded_at_a_quarter_and_turned_upright_once(orientation):
    """7.7 MP: libjpeg decodes it at 1/4 scale (OpenCV's own EXIF rotation off: `orient` turns it once)."""
    big = cv2.resize(upright(), (48 * 50, 64 * 50), interpolation=cv2.INTER_NEAREST)
    gray = load_image(encode_pil(unorient(big, orientation), "JPEG", orientation, quality=90))
    assert gray.shape == (800, 600)
    row, col = bar_corner(gray)
    assert abs(row - 50) <= 1 and abs(col - 50) <= 1


def test_a_large_png_is_shrunk_to_work_pixels_after_decoding():
    big = cv2.resize(upright(), (48 * 60, 64 * 60), interpolation=cv2.INTER_NEAREST)  # 11 MP
    gray = load_image(cv2.imencode(".png", big)[1].tobytes())
    assert gray.shape == (1155, 866)  # about decode.WORK_PIXELS, the aspect ratio kept
    row, col = bar_corner(gray)
    assert abs(row - 72) <= 1 and abs(col - 72) <= 1


@pytest.mark.parametrize(("image", "fmt", "megabytes"), [
    (np.zeros((4000, 4000, 4), np.uint16), ".png", 128), (np.zeros((2100, 2100, 4), np.uint8), ".png", 17.64),
    (np.zeros((2400, 2400, 3), np.uint8), ".webp", 17.28)], ids=["16-bit RGBA PNG", "RGBA PNG", "RGB WebP"])
def test_what_a_decode_would_write_is_refused_over_the_limit_from_the_header(image, fmt, megabytes):
    with pytest.raises(PreprocessError, match=rf"^image too large to decode: .* needs {megabytes:.0f} MB decoded"):
        load_image(cv2.imencode(fmt, image)[1].tobytes())


def test_a_progressive_jpeg_with_too_many_scans_is_refused_from_its_header():
    """Each scan is a pass over every coefficient of the picture: thousands fit in a small file."""
    data = encode_pil(np.full((512, 512), 200, np.uint8), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    many = data[:-2] + data[last:-2] * (decode.MAX_SCANS + 1) + b"\xff\xd9"  # the last scan repeated
    with pytest.raises(PreprocessError, match=r"^progressive JPEG with \d+ scans \(at most 64\)"):
        load_image(many)
    assert load_image(data).shape == (512, 512)


def test_junk_before_a_progressive_frame_does_not_hide_it():
    """libjpeg skips junk between markers (with a warning) and PIL does too: the frame is found either way."""
    data = encode_pil(np.full((3000, 3000), 200, np.uint8), "JPEG", progressive=True)  # 18 MB of coefficients
    sof = data.index(b"\xff\xc2")
    with pytest.raises(PreprocessError, match=r"^image too large to decode: 3000x3000 JPEG needs 18 MB"):
        load_image(data[:sof] + b"junk" + data[sof:])
