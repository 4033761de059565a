"""A printed-digit test set: 0-9 in the fonts Debian ships, each rendered as the picture a client sends.

MNIST's digits are handwritten by American census staff and students; people elsewhere and fonts
draw some digits differently: a 1 with a flag and a foot, a 7 with a crossbar, an open 4, a 9 with a
straight tail. Every face below is drawn in regular and bold, serif and sans, and every glyph in
three pictures (`STYLES`), deterministically: the same bytes on every machine with the same font
packages and Pillow (its bundled FreeType renders the glyphs). Each picture is the request the
TorchServe handler receives (`{"body": bytes}`), so `bench/eval_fonts.py` scores it through the
handler's own decoding, as `bench/eval_wild.py` does the wild MNIST set.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.tools.wild import Request, jpeg, png

FONT_DIR = Path("/usr/share/fonts")


@dataclass(frozen=True)
class Face:
    name: str
    package: str  # the Debian package that ships it (Makefile APT_PACKAGES)
    file: str  # under FONT_DIR
    features: tuple[str, ...] = ()  # OpenType character variants, applied by libraqm


# Andika's default 1 has a foot and its character variants (SIL's literacy font) give the shapes no
# other face has: cv01 a 1 with no foot, cv04 an open 4, cv06 a 6 and 9 with straight tails, cv07 a
# 7 with a crossbar. Comic Neue draws like a hand: open 4, 1 with flag and foot.
ANDIKA_VARIANTS = ("cv01", "cv04", "cv06", "cv07")
FACES = tuple(
    face
    for regular, bold in (
        (Face("DejaVu Sans", "fonts-dejavu-core", "truetype/dejavu/DejaVuSans.ttf"),
         Face("DejaVu Sans Bold", "fonts-dejavu-core", "truetype/dejavu/DejaVuSans-Bold.ttf")),
        (Face("DejaVu Serif", "fonts-dejavu-core", "truetype/dejavu/DejaVuSerif.ttf"),
         Face("DejaVu Serif Bold", "fonts-dejavu-core", "truetype/dejavu/DejaVuSerif-Bold.ttf")),
        (Face("Liberation Sans", "fonts-liberation2", "truetype/liberation2/LiberationSans-Regular.ttf"),
         Face("Liberation Sans Bold", "fonts-liberation2", "truetype/liberation2/LiberationSans-Bold.ttf")),
        (Face("Liberation Serif", "fonts-liberation2", "truetype/liberation2/LiberationSerif-Regular.ttf"),
         Face("Liberation Serif Bold", "fonts-liberation2", "truetype/liberation2/LiberationSerif-Bold.ttf")),
        (Face("FreeSans", "fonts-freefont-ttf", "truetype/freefont/FreeSans.ttf"),
         Face("FreeSans Bold", "fonts-freefont-ttf", "truetype/freefont/FreeSansBold.ttf")),
        (Face("FreeSerif", "fonts-freefont-ttf", "truetype/freefont/FreeSerif.ttf"),
         Face("FreeSerif Bold", "fonts-freefont-ttf", "truetype/freefont/FreeSerifBold.ttf")),
        (Face("Andika", "fonts-sil-andika", "truetype/andika/Andika-Regular.ttf"),
         Face("Andika Bold", "fonts-sil-andika", "truetype/andika/Andika-Bold.ttf")),
        (Face("Andika variants", "fonts-sil-andika", "truetype/andika/Andika-Regular.ttf", ANDIKA_VARIANTS),
         Face("Andika variants Bold", "fonts-sil-andika", "truetype/andika/Andika-Bold.ttf", ANDIKA_VARIANTS)),
        (Face("Comic Neue", "fonts-comic-neue", "opentype/comic-neue/ComicNeue-Regular.otf"),
         Face("Comic Neue Bold", "fonts-comic-neue", "opentype/comic-neue/ComicNeue-Bold.otf")),
    )
    for face in (regular, bold)
)


class FontsMissing(RuntimeError):
    """A face of the set is not installed; the message says what to run."""


def glyph(face: Face, digit: int, height: int) -> np.ndarray:
    """The digit's ink (0..255, bright on black) cropped to its outline, about `height` px tall."""
    path = FONT_DIR / face.file
    if not path.is_file():
        raise FontsMissing(f"font {path} ({face.package}) is not installed: run `make system-deps`")
    # Digits stand about 0.72 em tall in these faces: size the em so the glyph is `height` px.
    font = ImageFont.truetype(str(path), round(height / 0.72), layout_engine=ImageFont.Layout.RAQM)
    text = str(digit)
    features = list(face.features) or None
    left, top, right, bottom = (int(v) for v in font.getbbox(text, features=features))
    image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(image).text((2 - left, 2 - top), text, font=font, fill=255, features=features)
    ink = np.asarray(image)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)


def on_page(ink: np.ndarray, margin: float, paper: float = 255.0, pen: float = 0.0) -> np.ndarray:
    """The glyph centred on a square page, `margin` × its longer side of paper beyond it each way, uint8."""
    side = round((1 + 2 * margin) * max(ink.shape))
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    page = np.zeros((side, side), np.float32)
    page[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return np.rint(paper + (pen - paper) * page / 255.0).astype(np.uint8)


# --- the pictures: (face, digit, generator) → the request a client sends --------------------------

def printed(face: Face, digit: int, rng: np.random.Generator) -> Request:
    """Black on white, as a document or a web page shows it: a 120-px digit, PNG."""
    return {"body": png(on_page(glyph(face, digit, 120), margin=0.3))}


def small_text(face: Face, digit: int, rng: np.random.Generator) -> Request:
    """A screenshot crop of ordinary text: a 22-px digit, anti-aliased edges and all, PNG."""
    return {"body": png(on_page(glyph(face, digit, 22), margin=0.25))}


def photo(face: Face, digit: int, rng: np.random.Generator) -> Request:
    """A phone photo of a printout: grey paper, a lamp to one side, sensor noise, JPEG."""
    page = on_page(glyph(face, digit, 200), margin=0.4, paper=0.0, pen=255.0).astype(np.float32) / 255.0
    h, w = page.shape
    y, x = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(15, 35) * (np.cos(angle) * x / w + np.sin(angle) * y / h)
    paper = rng.uniform(150, 210) + light
    ink = rng.uniform(30, 70)
    picture = paper + (ink - paper) * page + rng.normal(0, rng.uniform(2, 6), page.shape)
    return {"body": jpeg(np.clip(np.rint(picture), 0, 255).astype(np.uint8), 85)}


STYLES: dict[str, Callable[[Face, int, np.random.Generator], Request]] = {
    "printed": printed,
    "small text": small_text,
    "photo": photo,
}


def check_installed() -> None:
    """FontsMissing naming every absent package, in one line."""
    missing = [face for face in FACES if not (FONT_DIR / face.file).is_file()]
    if missing:
        packages = " ".join(dict.fromkeys(face.package for face in missing))
        raise FontsMissing(f"{len(missing)} of the {len(FACES)} font faces are not installed ({packages}): "
                           "run `make system-deps`")


def render(face: Face, digit: int, style: str, seed: int = 0) -> Request:
    """Picture `style` of `digit` in `face`: the same bytes every time."""
    rng = np.random.default_rng([seed, FACES.index(face), digit, list(STYLES).index(style)])
    return STYLES[style](face, digit, rng)


def font_set(seed: int = 0) -> list[tuple[Face, int, str, Request]]:
    """Every (face, digit, style) of the set with its request, in a fixed order."""
    check_installed()
    return [(face, digit, style, render(face, digit, style, seed))
            for face in FACES for digit in range(10) for style in STYLES]


def main(argv: list[str] | None = None) -> int:
    """Write the set's pictures into a folder, to look at them."""
    from training.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m training.tools.fonts", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/fonts"))
    args = parser.parse_args(argv)
    try:
        items = font_set()
    except FontsMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for face, digit, style, request in items:
        suffix = ".jpg" if request["body"][:2] == b"\xff\xd8" else ".png"
        name = f"{face.name}-{digit}-{style}".replace(" ", "_")
        (args.out / name).with_suffix(suffix).write_bytes(request["body"])
    print(f"{len(items)} pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
