"""Wild digits: the base64 forms clients send, the JSON depth bound, and each to_mnist step for pictures
that are not clean scans (uneven light, stray marks, broken strokes, thin pen lines), plus the wild set.

Pictures are drawn with numpy and OpenCV, so the expected answers are known; the round-trip test
uses real MNIST test digits.
"""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

from serving.worker.json_body import MAX_JSON_DEPTH, nesting
from serving.worker.requests import decode_request
from training.core.inputs.preprocess import PreprocessError, paper, preprocess_bytes, to_mnist
from training.core.inputs.strokes import box_stroke_width, skeleton, stroke_width
from training.tools.wild import TRANSFORMS, on_paper, png, render, upscale


def seven(height: int = 120, width: int = 100, top: int = 20, left: int = 30, gap: int = 0) -> np.ndarray:
    """Black ink on white paper: an 80×50 "7" (a 12-px bar on top, a 14-px stem), the stem `gap` px below the bar."""
    page = np.full((height, width), 255, np.uint8)
    page[top : top + 12, left : left + 50] = 0
    page[top + 12 + gap : top + 80, left + 36 : left + 50] = 0
    return page


def ink_box(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# --- base64 as clients send it ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def png_7() -> bytes:
    data = png(seven())
    return data + b"\0" * (-len(data) % 3 or 1)  # bytes after IEND are ignored; they make base64 need padding


def body(obj: object) -> dict[str, bytes]:
    return {"body": json.dumps(obj).encode()}


def test_every_base64_form_decodes_to_the_same_digit(png_7):
    expected = preprocess_bytes(png_7)
    text = base64.b64encode(png_7).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # the `base64` tool's output
    forms = {
        "plain": body({"data": text}),
        "data URL": body({"data": "data:image/png;base64," + text}),  # canvas.toDataURL()
        "data URL, any image type and case": body({"data": "DATA:image/jpeg;BASE64," + text}),
        "wrapped": body({"data": wrapped}),
        "wrapped CRLF, spaces": body({"data": " " + wrapped.replace("\n", "\r\n") + "\n"}),
        "urlsafe, unpadded": body({"data": base64.urlsafe_b64encode(png_7).decode().rstrip("=")}),
        "data URL as the whole body": {"body": ("data:image/png;base64," + text).encode()},
    }
    assert text.endswith("=") and ("+" in text or "/" in text)  # so padding and the alphabet are really tested
    for name, request in forms.items():
        assert np.array_equal(decode_request(request), expected), name


@pytest.mark.parametrize(("request_", "message"), [
    (body({"data": "data:image/png,iVBORw0KGgo="}), "'data' URL must be base64-encoded: data:image/...;base64,..."),
    (body({"data": "data:text/plain;base64,aGVsbG8="}), "'data' URL is not an image: text/plain"),
    (body({"data": "data:;base64,aGVsbG8="}), "'data' URL is not an image: no media type"),
    (body({"data": "data:image/png;base64"}), "'data' URL must be base64-encoded: data:image/...;base64,..."),
    (body({"data": "iVBORw0KGgo=!"}), "'data' is not valid base64"),
    (body({"data": "abcde"}), "'data' is not valid base64"),  # 5 characters: no padding makes that whole
    ({"body": b"[" * 50_000}, f"JSON nested too deeply: at most {MAX_JSON_DEPTH} levels"),
    ({"body": b'{"pixels": ' + b"[" * 33 + b"0" + b"]" * 33 + b"}"}, "JSON nested too deeply: at most 32 levels"),
    ({"body": b'{"data": "' + b"[" * 50_000 + b'"}'}, "'data' is not valid base64"),  # brackets in a string
    ({"body": b"[" * 32 + b"]" * 32}, "JSON body must be an object with 'data' or 'pixels'"),
])
def test_bad_base64_and_deep_json_are_refused_with_a_message(request_, message):
    with pytest.raises(PreprocessError) as err:
        decode_request(request_)
    assert str(err.value) == message


@pytest.mark.parametrize(("raw", "depth"), [
    (b"", 0), (b"7", 0), (b"[[[]]]", 3), (b'{"a": [[1]]}', 3), (b'{"a": "[[[["}', 1),
    (b'{"a": "\\"[[["}', 1),  # an escaped quote does not end the string
    (b'{"a": "\\\\", "b": [[1]]}', 3),  # an escaped backslash does not escape the closing quote
])
def test_nesting_counts_brackets_outside_strings(raw, depth):
    assert nesting(raw) == depth


# --- to_mnist's steps on pictures that are not clean scans -----------------------------------------

def test_skeleton_thins_a_bar_to_its_centre_line_and_keeps_a_line():
    bar = np.zeros((30, 40), bool)
    bar[10:20, 5:35] = True
    assert [tuple(p) for p in np.argwhere(skeleton(bar))] == [(14, c) for c in range(10, 30)]
    line = np.zeros((30, 40), bool)
    line[5, 3:30] = True
    assert np.array_equal(skeleton(line), line)


@pytest.mark.parametrize(("width", "expected"), [(1, 2.0), (2, 2.0), (3, 480 / 162), (10, 1600 / 176)])
def test_stroke_width_is_twice_area_over_edge_pixels(width, expected):
    bar = np.zeros((100, 100), bool)
    bar[20 : 20 + width, 10:90] = True
    assert stroke_width(bar) == pytest.approx(expected, abs=1e-12)


def test_evenly_lit_paper_is_the_border_level():
    assert paper(seven()) == 255.0
    assert paper(255 - seven()) == 0.0


def shaded(page: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(photo, light): `page` (255 paper, 0 ink) as pencil on grey paper lit from the left with vignetting."""
    h, w = page.shape
    y, x = np.mgrid[0:h, 0:w]
    x, y = (x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1
    light = 180 + 30 * x - 20 * y * y
    return np.rint(light * (1 - 0.6 * (1 - page / 255.0))).astype(np.uint8), light  # pencil: 40% of the light


def test_uneven_light_is_fitted_and_removed():
    photo, light = shaded(seven(240, 200, 40, 60))
    assert np.abs(paper(photo) - light).max() < 1.0  # grey levels, over the whole page, ink included
    clean = to_mnist(seven(240, 200, 40, 60))
    assert np.abs(to_mnist(photo).astype(int) - clean).max() <= 2  # rounding of the fitted surface


def test_a_speck_far_from_the_digit_is_dropped():
    page = seven(300, 300, 40, 40)
    clean = to_mnist(page)
    page[270:278, 270:278] = 0  # dust in the far corner: without this it would widen the crop
    assert np.array_equal(to_mnist(page), clean)


def test_a_broken_stroke_and_a_dotted_stroke_are_kept_whole():
    broken = to_mnist(seven(gap=6))  # the bar and the stem do not touch
    assert ink_box(broken) == (20, 12)
    dots = np.full((200, 120), 255, np.uint8)
    for top in range(20, 180, 16):  # a "1" of ten 8×8 dots
        dots[top : top + 8, 56:64] = 0
    assert ink_box(to_mnist(dots)) == (20, 3)  # a hairline at 20 px: redrawn at MNIST's stroke width


def test_a_thin_pen_line_on_a_big_canvas_gets_mnist_strokes():
    page = np.full((400, 400), 255, np.uint8)
    cv2.line(page, (100, 80), (300, 80), 0, 2)
    cv2.line(page, (300, 80), (180, 330), 0, 2)
    assert box_stroke_width(255.0 - page[79:332, 99:302]) < 1.5  # as drawn: far thinner than MNIST's 2.6
    digit = to_mnist(page)
    assert digit.max() == 255  # not the 26/255 ghost a plain downscale leaves
    assert ink_box(digit)[0] == 20
    assert 2.5 <= stroke_width(digit >= 128) <= 3.5  # MNIST's median stroke, 2.6, at the 28×28 pixel grid


def test_an_mnist_digit_upscaled_to_280px_comes_back_close_to_the_original(mnist_test_images):
    """Not bit-exact: the 20-px box is measured again on resampled ink and the centre of mass is rounded to
    a whole pixel, so a digit can land one pixel away from where MNIST put it (MNIST's centres spread
    ±0.3 px around (14, 14)), and resampling twice softens the edges. Tolerance, from the measured
    spread over these 200 digits (lowest 0.86, median 0.98): after the best shift of at most one pixel
    every digit correlates ≥ 0.85 with the original, and unshifted the median correlation is ≥ 0.95."""
    images, _ = mnist_test_images
    best, unshifted = [], []
    for image in images[:200].numpy():
        served = preprocess_bytes(png(np.rint(upscale(image, 280)).astype(np.uint8))).astype(np.float64)
        unshifted.append(np.corrcoef(served.ravel(), image.ravel())[0, 1])
        best.append(max(np.corrcoef(np.roll(served, (dy, dx), (0, 1)).ravel(), image.ravel())[0, 1]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)))
    assert min(best) >= 0.85
    assert np.median(unshifted) >= 0.95


# --- the wild set ----------------------------------------------------------------------------------

def test_the_wild_set_is_deterministic_and_every_transform_is_served(mnist_test_images):
    images, labels = mnist_test_images
    assert labels[0] == 7
    for name in TRANSFORMS:
        first = render(name, images[0].numpy(), 0)
        assert render(name, images[0].numpy(), 0) == first, name
        assert render(name, images[0].numpy(), 1) != first, name  # each digit index draws its own canvas
        digit = decode_request(first)
        assert digit.shape == (28, 28) and digit.max() == 255, name


def test_on_paper_mixes_pen_and_paper_by_the_ink():
    ink_map = np.array([[0.0, 127.5, 255.0]])
    assert on_paper(ink_map).tolist() == [[255, 128, 0]]
    assert on_paper(ink_map, paper=200, pen=40).tolist() == [[200, 120, 40]]


def test_eval_wild_prints_a_row_per_transform_and_draws_the_failures(mnist_dir, tmp_path, capsys):
    from serving_fixtures import save_tiny_checkpoint

    from bench.eval_wild import main

    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")  # untrained: plenty of failures to draw
    failures = tmp_path / "wild_failures.png"
    assert main(["--checkpoint", str(checkpoint), "--data-dir", str(mnist_dir), "--dry-run",
                 "--transforms", "dark on light,data-URL JSON", "--failures", str(failures)]) == 0
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["| transform", "| clean 28×28 (training's tensors)", "| dark on light", "| data-URL JSON",
                    "| **all wild**"]
    assert failures.stat().st_size > 0 and failures.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--checkpoint", str(checkpoint), "--transforms", "sepia"]) == 1
