"""A "wild" MNIST test set: each test digit rendered the way browsers and phones send digits.

Made from MNIST's test split (never trained on), deterministically: digit i of transform t always
gets the same canvas, colours, noise and encoding (a generator seeded with (seed, t, i)). Each
transform returns the request the TorchServe handler receives (`{"body": bytes}`), so
`bench/eval_wild.py` can score them through the handler's own decoding. `--stroke-widths` prints
the MNIST stroke-width percentiles that training/core/inputs/preprocess.py's THIN_STROKE and STROKE_TARGET come from.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Callable

import cv2
import numpy as np
import pillow_heif
from PIL import Image

from training.cli import ArgumentParser
from training.core.inputs.decode import ORIENTATION_TAG
from training.core.inputs.preprocess import digit_box, ink
from training.core.inputs.strokes import box_stroke_width, skeleton

Request = dict[str, bytes]


def canvas_size(rng: np.random.Generator, low: int = 64, high: int = 1024) -> int:
    """Log-uniform: as many small canvases (64-128 px) as big ones (512-1024 px)."""
    return round(float(np.exp(rng.uniform(np.log(low), np.log(high)))))


def upscale(digit: np.ndarray, size: int) -> np.ndarray:
    """The 28×28 digit (bright on black) smoothly enlarged to size×size, as a drawing at that size."""
    big = cv2.resize(digit.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(big, 0, 255)


def on_paper(ink_map: np.ndarray, paper: float = 255.0, pen: float = 0.0) -> np.ndarray:
    """Bright-on-black ink (0..255) → pen-coloured ink on paper-coloured background, uint8."""
    alpha = ink_map / 255.0
    return np.rint(paper + (pen - paper) * alpha).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buffer.tobytes()


def unorient(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for `upright` with this EXIF orientation (the inverse of decode.orient)."""
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)
    stored = np.rot90(upright, -turns)
    return np.ascontiguousarray(stored[:, ::-1] if orientation in (2, 4, 5, 7) else stored)


def pen_strokes(digit: np.ndarray, size: int, width: int) -> np.ndarray:
    """The digit's centre lines drawn with a `width`-px anti-aliased pen on a size×size canvas (bright on black)."""
    lines = skeleton(upscale(digit, 112) >= 128)
    ys, xs = np.nonzero(lines)
    scale = size / 112
    segments = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # join 8-connected skeleton pixels
        ny, nx = ys + dy, xs + dx
        inside = (ny < 112) & (nx >= 0) & (nx < 112)
        joined = inside.copy()
        joined[inside] = lines[ny[inside], nx[inside]]
        for y0, x0, y1, x1 in zip(ys[joined], xs[joined], ny[joined], nx[joined], strict=True):
            segments.append(np.array([[(x0 + 0.5) * scale, (y0 + 0.5) * scale],
                                      [(x1 + 0.5) * scale, (y1 + 0.5) * scale]]) * 16)
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [s.round().astype(np.int32) for s in segments], False, 255, width, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32)


# --- the transforms: (28×28 MNIST digit, generator) → the request a client sends ------------------

def dark_on_light(digit, rng) -> Request:
    return {"body": png(on_paper(upscale(digit, canvas_size(rng))))}


def light_on_dark(digit, rng) -> Request:
    return {"body": png(on_paper(upscale(digit, canvas_size(rng)), paper=0, pen=255))}


def coloured_ink(digit, rng) -> Request:
    big = upscale(digit, canvas_size(rng))[:, :, None]
    paper, pen = rng.uniform(170, 255, 3), rng.uniform(0, 110, 3)  # light paper, dark pen, any hue
    return {"body": png(np.rint(paper + (pen - paper) * big / 255.0).astype(np.uint8))}


def thin_pen(digit, rng) -> Request:
    size = canvas_size(rng, 200, 800)
    return {"body": png(on_paper(pen_strokes(digit, size, int(rng.integers(1, 3)))))}


def thick_marker(digit, rng) -> Request:
    size = canvas_size(rng, 128, 512)
    radius = max(1, round(size / 28 * rng.uniform(0.6, 1.0)))  # 0.6-1 MNIST pixel more on each side
    brush = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return {"body": png(on_paper(cv2.dilate(upscale(digit, size), brush)))}


def jpeg_quality(digit, rng) -> Request:
    return {"body": jpeg(on_paper(upscale(digit, canvas_size(rng))), int(rng.integers(30, 91)))}


def exif_rotated_jpeg(digit, rng) -> Request:
    orientation = int(rng.integers(2, 9))  # 3, 6, 8: a phone held upside down or sideways; 2, 4, 5, 7 mirrored
    stored = unorient(on_paper(upscale(digit, canvas_size(rng, 128, 1024))), orientation)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return {"body": buffer.getvalue()}


def shaded_photo(digit, rng) -> Request:
    """Pencil on grey paper under uneven light, with sensor noise, saved as a phone JPEG."""
    size = canvas_size(rng, 128, 768)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(15, 40) * (np.cos(angle) * x + np.sin(angle) * y) * 2  # a lamp to one side
    light -= rng.uniform(10, 30) * (x * x + y * y) * 4  # lens vignetting: darker corners
    level = rng.uniform(150, 225)
    paper = level + light
    darkness = 1 - rng.uniform(40, 110) / level  # pencil reflects 20-70% of the light the paper does
    alpha = upscale(digit, size) / 255.0
    photo = paper * (1 - darkness * alpha) + rng.normal(0, rng.uniform(3, 10), (size, size))
    return {"body": jpeg(np.clip(np.rint(photo), 0, 255).astype(np.uint8), 85)}


def small_rotation(digit, rng) -> Request:
    size = canvas_size(rng)
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-10, 10), 1.0)
    rotated = cv2.warpAffine(upscale(digit, size), turn, (size, size), flags=cv2.INTER_LINEAR)
    return {"body": png(on_paper(rotated))}


def off_centre(digit, rng) -> Request:
    """A small digit somewhere on a big page: 20-50% of the canvas side, anywhere it fits."""
    size = canvas_size(rng, 256, 1024)
    side = int(size * rng.uniform(0.2, 0.5))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    page = np.zeros((size, size), np.float32)
    page[top : top + side, left : left + side] = upscale(digit, side)
    return {"body": png(on_paper(page))}


def transparent_png(digit, rng) -> Request:
    """What canvas.toBlob() sends: black strokes whose alpha is the ink, the rest fully transparent."""
    alpha = np.rint(upscale(digit, canvas_size(rng, 128, 512))).astype(np.uint8)
    return {"body": png(np.dstack([np.zeros_like(alpha)] * 3 + [alpha]))}


def data_url_json(digit, rng) -> Request:
    """What canvas.toDataURL() sends, in a JSON body."""
    image = png(on_paper(upscale(digit, canvas_size(rng, 128, 512))))
    return {"body": json.dumps({"data": "data:image/png;base64," + base64.b64encode(image).decode()}).encode()}


def heic_photo(digit, rng) -> Request:
    """The iPhone camera's default format."""
    image = Image.fromarray(on_paper(upscale(digit, canvas_size(rng, 64, 512))))
    buffer = io.BytesIO()
    image.save(buffer, "HEIF", quality=int(rng.integers(50, 91)))
    return {"body": buffer.getvalue()}


TRANSFORMS: dict[str, Callable[[np.ndarray, np.random.Generator], Request]] = {
    "dark on light": dark_on_light,
    "light on dark": light_on_dark,
    "coloured ink": coloured_ink,
    "thin pen 1-2 px": thin_pen,
    "thick marker": thick_marker,
    "JPEG q30-90": jpeg_quality,
    "EXIF-rotated JPEG": exif_rotated_jpeg,
    "shaded photo": shaded_photo,
    "rotated ±10°": small_rotation,
    "off-centre": off_centre,
    "transparent PNG": transparent_png,
    "data-URL JSON": data_url_json,
    "HEIC": heic_photo,
}
pillow_heif.register_heif_opener()  # for the HEIC transform's encoder


def render(name: str, digit: np.ndarray, index: int, seed: int = 0) -> Request:
    """Transform `name` of test digit number `index`: the same bytes every time."""
    rng = np.random.default_rng([seed, list(TRANSFORMS).index(name), index])
    return TRANSFORMS[name](np.asarray(digit, np.uint8), rng)


def stroke_widths(images: np.ndarray, size: int = 224) -> np.ndarray:
    """Stroke width in the 20-px box of each MNIST digit, measured as to_mnist measures a picture."""
    widths = []
    for image in images:
        ink_map = ink(np.rint(upscale(image, size)).astype(np.uint8))
        top, bottom, left, right = digit_box(ink_map)
        widths.append(box_stroke_width(ink_map[top:bottom, left:right]))
    return np.array(widths)


def main(argv: list[str] | None = None) -> int:
    from training.data import DataError, load_split

    parser = ArgumentParser(prog="python -m training.tools.wild", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--stroke-widths", type=int, default=2000, metavar="N",
                        help="print the stroke-width percentiles of the first N training digits")
    args = parser.parse_args(argv)
    try:
        images, _ = load_split(args.data_dir, train=True)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    widths = stroke_widths(images[: args.stroke_widths].numpy())
    for q in (1, 2, 5, 50, 95, 98, 99):
        print(f"p{q:<2}  {np.percentile(widths, q):.2f} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
