"""The printed-digit set (training/tools/fonts.py), its scorer (bench/eval_fonts.py) and the printed strokes
training draws onto some MNIST digits (training/printed.py).

The fonts come from Debian packages (`make system-deps`); without them these tests skip, and the
set itself refuses in one line. The slow test scores the session's briefly trained checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.worker.requests import decode_request
from training.core.inputs.preprocess import to_mnist
from training.printed import MAX_SLANT, broad_pen, crossbar, flag_and_foot, slant, with_printed_strokes
from training.tools.fonts import FACES, STYLES, FontsMissing, check_installed, font_set, glyph, render

try:
    check_installed()
    MISSING = None
except FontsMissing as err:
    MISSING = str(err)
needs_fonts = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def ink_box(image: np.ndarray, level: int = 0) -> tuple[int, int]:
    rows, cols = np.flatnonzero((image > level).any(axis=1)), np.flatnonzero((image > level).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def face(name: str):
    return next(f for f in FACES if f.name == name)


# --- the font set --------------------------------------------------------------------------------

@needs_fonts
def test_the_font_set_is_deterministic_and_every_picture_is_served():
    items = font_set()
    assert len(items) == len(FACES) * 10 * len(STYLES) == 540
    assert len({(f.name, d, s) for f, d, s, _ in items}) == len(items)
    for f, digit, style, request in items[:: len(STYLES) * 10 + 1]:  # every face, digit and style once
        assert render(f, digit, style) == request, (f.name, digit, style)
        seen = decode_request(request)
        assert seen.shape == (28, 28) and seen.max() == 255, (f.name, digit, style)
    photos = [r["body"] for f, d, s, r in items if s == "photo" and d == 0]
    assert len(set(photos)) == len(photos)  # each picture draws its own light and noise


@needs_fonts
def test_andika_variants_change_exactly_the_1_4_6_7_and_9():
    default, variants = face("Andika"), face("Andika variants")
    changed = [d for d in range(10) if not np.array_equal(glyph(default, d, 60), glyph(variants, d, 60))]
    assert changed == [1, 4, 6, 7, 9]


@needs_fonts
def test_a_1_with_flag_and_foot_keeps_its_aspect_as_mnist_scales_it():
    """MNIST fits the longer side into 20 px and keeps the aspect: a serif 1 stays a narrow upright shape
    with its foot, centred by its mass at (14, 14), at every size a client sends it."""
    one = glyph(face("DejaVu Serif"), 1, 120)
    expected_width = 20 * one.shape[1] / one.shape[0]
    for style in STYLES:
        seen = decode_request(render(face("DejaVu Serif"), 1, style)).astype(np.float64)
        height, width = ink_box(seen, level=0.15 * 255)
        assert height == 20, style
        assert abs(width - expected_width) <= 1.5, (style, width, expected_width)
        rows, cols = np.indices(seen.shape)
        centre = ((rows * seen).sum() / seen.sum(), (cols * seen).sum() / seen.sum())
        assert np.allclose(centre, 14, atol=0.5), (style, centre)


def test_missing_fonts_are_one_line_that_names_make_system_deps(monkeypatch, tmp_path, capsys):
    from bench import eval_fonts
    from training.tools import fonts

    monkeypatch.setattr(fonts, "FONT_DIR", tmp_path)
    with pytest.raises(FontsMissing, match=r"18 of the 18 font faces are not installed \(fonts-dejavu-core .*\): "
                                           r"run `make system-deps`"):
        check_installed()
    from serving_fixtures import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    assert eval_fonts.main(["--checkpoint", str(checkpoint), "--no-record"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "make system-deps" in err


@needs_fonts
def test_eval_fonts_prints_a_row_per_face_and_writes_a_record(tmp_path, monkeypatch, capsys):
    import json

    from serving_fixtures import save_tiny_checkpoint

    from bench import eval_fonts, record

    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")  # untrained: answers are wrong, the path is what counts
    monkeypatch.setattr(eval_fonts, "write_record", lambda *a, **k: record.write_record(*a, **k, out_dir=tmp_path))
    seen = tmp_path / "seen.png"
    assert eval_fonts.main(["--checkpoint", str(checkpoint), "--seen", str(seen)]) == 0
    lines = capsys.readouterr().out.splitlines()
    faces = [line.split(" | ")[0][2:] for line in lines if line.startswith("| ") and " | " in line]
    assert faces[1 : 1 + len(FACES)] == [f.name for f in FACES]
    assert seen.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (path,) = tmp_path.glob("*-eval-fonts-*.json")
    figures = json.loads(path.read_text())["figures"]
    assert figures["pictures"] == 540 and set(figures["per_digit"]) == {str(d) for d in range(10)}
    assert sum(v["pictures"] for v in figures["per_style"].values()) == 540


# --- printed strokes on MNIST training digits ----------------------------------------------------

def test_printed_strokes_replace_the_chosen_digits_deterministically_in_mnist_format(mnist_test_images):
    images, labels = (t[:2000].numpy() for t in mnist_test_images)
    out = with_printed_strokes(images, labels, 0.3, 0.1, seed=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = np.flatnonzero((out != images).any(axis=(1, 2)))
    upright_ones = sum(abs(slant(images[i])) < MAX_SLANT for i in np.flatnonzero(labels == 1))
    redrawn = round(0.3 * upright_ones) + round(0.3 * (labels == 7).sum())
    assert len(changed) == redrawn + round(0.1 * (len(images) - redrawn))
    assert np.array_equal(with_printed_strokes(images, labels, 0.3, 0.1, seed=0), out)
    assert not np.array_equal(with_printed_strokes(images, labels, 0.3, 0.1, seed=1), out)
    for digit in out[changed]:  # what to_mnist makes of a big picture: serving takes each as MNIST-format
        assert np.array_equal(to_mnist(digit), digit)
    assert np.array_equal(with_printed_strokes(images, labels, 0.0, 0.0), images)


def test_a_flag_widens_an_upright_1_a_crossbar_crosses_a_7_a_broad_pen_widens_a_digit(mnist_test_images):
    images, labels = (t[:2000].numpy() for t in mnist_test_images)
    one = next(images[i] for i in np.flatnonzero(labels == 1) if abs(slant(images[i])) < 0.1)
    rng = np.random.default_rng(0)
    flagged = flag_and_foot(one, rng)
    assert ink_box(flagged, 38)[0] == 20 and ink_box(flagged, 38)[1] >= ink_box(one, 38)[1] + 3
    seven = images[np.flatnonzero(labels == 7)[0]]
    crossed = crossbar(seven, rng)
    # The stem's middle rows hold one short run of ink in a 7; the crossbar makes one of them wider.
    widest = lambda d: max(np.count_nonzero(d[r] > 128) for r in range(12, 20))  # noqa: E731
    assert widest(crossed) >= widest(seven) + 3
    # A broad pen held flat: the digit gets wider, its height stays the 20-px box.
    pen = broad_pen(seven, rng)
    assert ink_box(pen, 38)[0] == 20 and ink_box(pen, 38)[1] > ink_box(seven, 38)[1]


# --- a trained model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def printed_slice(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """serving_fixtures.TRAIN_SLICE with the digits redrawn in print's shapes, as configs/train.yaml has them."""
    from serving_fixtures import TRAIN_SLICE, train_slice

    from training import config as cfglib
    from training.train_config import DEFAULT_CONFIG

    printed = {k: v for k, v in TRAIN_SLICE.items() if k not in ("printed_strokes", "broad_pen")}
    # The one-cycle shape this 2-epoch slice was measured with: a 25% warm-up, momentum cycled. With the
    # 5-epoch default's 15% and fixed momentum, seed 0 read all 54 printed 1s but called 48 of them digits
    # (seeds 0 and 1 pass all three checks with these two settings).
    printed.update(warmup=0.25, cycle_momentum=True)
    defaults = cfglib.load_yaml(DEFAULT_CONFIG)
    assert defaults["printed_strokes"] > 0 and defaults["broad_pen"] > 0
    return train_slice(mnist_dir, tmp_path_factory.mktemp("printed"), printed)


@needs_fonts
@pytest.mark.slow
def test_a_briefly_trained_model_reads_printed_1s_and_calls_the_set_digits(printed_slice):
    """12k images, 2 epochs, digits redrawn in print's shapes: the set's 54 1s are read right and called
    digits (measured: all 54; the same slice on plain MNIST: 11 right, 26 called digits). Its 6s and
    9s are underfitted at 2 epochs (measured 76% and 52% right), so the whole set's ≥ 99% is
    `make eval-fonts` on a fully trained model, not this test."""
    from bench.eval_fonts import figures, score
    from training.checkpoint import load_checkpoint

    result = figures(score(load_checkpoint(printed_slice)))
    assert result["refused"] == 0
    ones = result["per_digit"]["1"]
    assert ones["accuracy"] >= 0.95 and ones["is_digit"] >= 0.95
    assert result["is_digit"] >= 0.99
