"""Image bytes → MNIST-style 28×28 digit → normalised array. Shared verbatim by training, serving and edge/.

Training reads MNIST, which is already in the format `to_mnist` produces, and calls `normalize`
(training/core/tensors.py, the torch twin of `normalize_array`); the TorchServe handler calls
`load_image` (training/core/inputs/decode.py) → `to_mnist` → `normalize`. This file and decode.py are packed into
the `.mar` and into the torch-free edge client (edge/), so they import nothing else from the
repository (decode.py relatively: it sits beside this file in all three) and never import torch.
"""

from __future__ import annotations

import cv2
import numpy as np

from .decode import MAX_PIXELS, MIN_SIDE, PreprocessError, load_image  # noqa: F401  (re-exported)
from .strokes import BOX, INK_THRESHOLD, THIN_STROKE, box_stroke_width, redraw

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SIZE = 28  # MNIST images are 28×28 ...
# ... and its centre of mass at pixel (14, 14), not at the geometric centre 13.5: the mean over the
# 60k training digits is (13.996, 14.007) in (row, column). Serving at 13.5 shifted every digit.
MNIST_CENTRE = 14.0
PAPER_GRID = 64  # the illumination is fitted on the picture shrunk to at most 64 px a side: it is smooth
UNEVEN_PAPER = 8.0  # grey levels of light falloff across the page above which it is subtracted
PART_AREA = 0.02  # a separate ink component of at least 2% of the largest one may be part of the digit...
PART_REACH = 0.25  # ... if it lies within 25% of the digit's size from it (a broken 5's bar, a dotted stroke)
PART_REACH_PAGE = 0.05  # ... plus 5% of the picture's size (the first dot of a dotted stroke is tiny)
# More parts than this of at least PART_AREA each is a pattern, not a digit (MNIST digits have 1-3; a dotted
# stroke a few dozen): refused, which also bounds the cost of joining them (a 49×41,000 PNG of dots has ~500k).
MAX_PARTS = 256
MIN_CONTRAST = 16  # grey levels the ink must stand out from the paper by (below: "no contrast")
# A 28×28 picture is taken as MNIST-format, but clients also send one on grey paper or faint: its paper
# level is subtracted and its ink stretched to full brightness when the brightest ink is below
# FULL_INK. Every MNIST digit has paper 0 and brightest ink 254 or 255, so MNIST passes unchanged.
FULL_INK = 250
MIN_INK_PIXELS = 10  # ink pixels a 28×28 digit has at least (MNIST's fewest: 32); fewer is a dot or a speck


def from_pixels(pixels: object) -> np.ndarray:
    """Validate a JSON pixel array (28 rows of 28 values in 0..255) and return it as uint8."""
    try:
        array = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float range
        raise PreprocessError("pixels must be 28 rows of 28 numbers") from None
    if array.shape != (SIZE, SIZE):
        raise PreprocessError(f"pixels must have shape 28x28, got {'x'.join(map(str, array.shape)) or 'scalar'}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise PreprocessError("pixel values must be numbers in 0..255")
    if 0 < array.max() <= 1:
        raise PreprocessError("pixel values must be in 0..255, these are all in 0..1: multiply them by 255")
    return np.rint(array).astype(np.uint8)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Make any digit picture look like an MNIST digit: 28×28 uint8, bright ink on black.

    The MNIST procedure: ink bright on dark, crop to the ink, scale the longer side to 20 px
    keeping the aspect ratio, paste into 28×28 so the centre of mass sits where MNIST has it, (14, 14).
    A 28×28 input is taken to be MNIST-format already and only has its polarity fixed, so MNIST
    images pass through unchanged (that is what makes training and serving see the same tensor).
    Larger pictures first lose what MNIST never had: uneven lighting and paper grain (`ink`), stray
    marks away from the digit (`digit_box`), strokes far thinner than a 20-px MNIST digit's and the
    faint grey a thin stroke becomes when shrunk (`scale_into_box`).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise PreprocessError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if gray.size == 0:
        raise PreprocessError("empty image: no pixels")
    if gray.shape == (SIZE, SIZE):
        return _mnist_format(gray)

    ink_map = ink(gray)
    top, bottom, left, right = digit_box(ink_map)
    digit = scale_into_box(ink_map[top:bottom, left:right])
    new_h, new_w = digit.shape
    # Centre of mass → MNIST's centre, clamped so the whole digit stays inside the 28×28 field.
    total = float(digit.sum())
    cy = float((digit.sum(axis=1) * np.arange(new_h)).sum()) / total
    cx = float((digit.sum(axis=0) * np.arange(new_w)).sum()) / total
    top = min(max(round(MNIST_CENTRE - cy), 0), SIZE - new_h)
    left = min(max(round(MNIST_CENTRE - cx), 0), SIZE - new_w)
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + new_h, left : left + new_w] = digit
    return _enough_ink(np.rint(np.clip(out, 0, 255)).astype(np.uint8))


def _mnist_format(gray: np.ndarray) -> np.ndarray:
    """A 28×28 picture: polarity fixed, paper level taken out and faint ink stretched (see FULL_INK)."""
    twice_paper = _twice_border_median(gray)
    if twice_paper > 2 * 127:  # dark ink on light paper: MNIST is the other way round
        gray = 255 - gray
        twice_paper = 2 * 255 - twice_paper  # the same two middle pixels of the ring, inverted
    brightest = int(gray.max())
    if brightest == 0:
        raise PreprocessError("no digit found: the image is blank")
    paper_level = twice_paper // 2
    peak = brightest - paper_level
    if peak < MIN_CONTRAST:
        raise PreprocessError("no digit found: the image has no contrast")
    if paper_level or peak < FULL_INK:
        levels = (gray.astype(np.float32) - paper_level) * (255.0 / peak)
        gray = np.rint(np.clip(levels, 0, 255)).astype(np.uint8)
    return _enough_ink(np.ascontiguousarray(gray))


def _enough_ink(digit: np.ndarray) -> np.ndarray:
    """The 28×28 digit, unless it has fewer than MIN_INK_PIXELS of ink: then it is a dot, not a digit."""
    if np.count_nonzero(digit > INK_THRESHOLD * 255) < MIN_INK_PIXELS:
        raise PreprocessError("no digit found: too little ink (a dot or a speck, not a digit)")
    return digit


def _twice_border_median(gray: np.ndarray) -> int:
    """2 × np.median of the outermost ring of pixels (each side taken whole, corners twice), from a
    sort: np.median's generic path costs more than the rest of a 28×28 request's preprocessing. The
    ring has 2·(height + width) pixels, an even count: its median is the mean of the two middle values."""
    ring = np.sort(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    middle = len(ring) // 2
    return int(ring[middle - 1]) + int(ring[middle])


def ink(gray: np.ndarray) -> np.ndarray:
    """Any picture → float32 ink in 0..255 on black: paper, its lighting and its grain removed.

    Dark ink on light paper is turned round, as MNIST is light on dark. Which side the ink is on is
    decided once the lighting is taken out, by which way the picture strays further from its paper:
    grey paper in a dim photo can be darker than mid-grey, so the paper's brightness alone cannot tell.
    """
    page = paper(gray)
    residual = gray.astype(np.float32) - page
    if -float(residual.min()) > float(residual.max()):  # dark ink
        residual = np.negative(residual, out=residual)
        if isinstance(page, np.ndarray):
            # Light multiplies: the same pencil is half as dark, in grey levels, where the page gets
            # half the light. Ink is measured relative to the paper under it, as a fraction.
            residual *= 255.0 / np.maximum(page, 1.0)
    # Paper grain and sensor noise: subtract the paper's level plus 3σ of its spread, so speckle does
    # not turn into ink once the contrast is stretched. Measured on a frame around the picture, which
    # is taken to be paper (a tight crop may be mostly ink).
    frame = max(1, min(gray.shape) // 32)
    edge = np.concatenate([residual[:frame].ravel(), residual[-frame:].ravel(),
                           residual[:, :frame].ravel(), residual[:, -frame:].ravel()])
    level = float(np.median(edge))
    noise = 1.4826 * float(np.median(np.abs(edge - level)))  # the MAD as a robust standard deviation
    residual -= level + 3 * noise
    np.clip(residual, 0, None, out=residual)
    peak = float(residual.max())
    if peak < MIN_CONTRAST:  # no stroke stands out from the paper
        raise PreprocessError("no digit found: the image has no contrast")
    residual *= 255.0 / peak
    return residual


def paper(gray: np.ndarray) -> np.ndarray | float:
    """The paper's brightness under the picture's lighting: the border's level, or a smooth surface.

    A phone photo of paper is darker in one corner than another: a single background level would
    either leave shadow as ink or erase faint pencil. A quadratic surface is fitted to the paper
    pixels on the picture shrunk to PAPER_GRID px, where it is cheap: first to the outer frame (paper,
    as MNIST's framing assumes; a quadratic is fully determined by a rectangle's edges), then to
    every pixel within 2.5σ of that surface, which leaves the ink out, dark or light. Smooth by
    construction, it cannot eat a thick stroke the way a large-kernel blur or morphological opening
    can. An evenly lit picture gets the border's median, as a scan or a canvas drawing always did.
    """
    height, width = gray.shape
    background = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    f = min(1.0, PAPER_GRID / max(height, width))
    small = cv2.resize(gray, (max(1, round(width * f)), max(1, round(height * f))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape
    y, x = np.mgrid[0:sh, 0:sw]
    terms = _quadratic_terms((x.ravel() + 0.5) / sw * 2 - 1, (y.ravel() + 0.5) / sh * 2 - 1)
    values = small.ravel().astype(np.float64)
    keep = ((x == 0) | (y == 0) | (x == sw - 1) | (y == sh - 1)).ravel()
    for _ in range(4):
        if keep.sum() < 4 * terms.shape[1]:  # too few paper pixels to fit a surface to
            return background
        fit = terms[keep]
        try:  # the normal equations: 6×6, and far faster than lstsq's SVD on a busy machine
            coef = np.linalg.solve(fit.T @ fit, fit.T @ values[keep])
        except np.linalg.LinAlgError:  # a picture one pixel high or wide has no surface to fit
            return background
        residual = values - terms @ coef
        spread = 1.4826 * float(np.median(np.abs(residual[keep]))) + 1.0
        keep = np.abs(residual) < 2.5 * spread
    fitted = terms @ coef
    if fitted.max() - fitted.min() < UNEVEN_PAPER:  # evenly lit: the border's level, as scanned digits get
        return background
    xs = ((np.arange(width) + 0.5) / width * 2 - 1).astype(np.float32)[None, :]
    ys = ((np.arange(height) + 0.5) / height * 2 - 1).astype(np.float32)[:, None]
    c = coef.astype(np.float32)
    return c[0] + c[1] * xs + c[2] * ys + c[3] * xs * xs + c[4] * xs * ys + c[5] * ys * ys


def _quadratic_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def digit_box(ink_map: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the digit's ink; stray marks away from it are erased from `ink_map`.

    The largest connected ink component is the digit, or its main part: a broken 5's bar and a dotted
    stroke are separate components, so others are kept too when they are not tiny (PART_AREA of the
    largest) and lie near what is kept so far (PART_REACH of its size, plus PART_REACH_PAGE of the
    picture's). A speck of dust or a dot in a corner, which would otherwise stretch the crop and shrink
    the digit, is dropped.
    """
    ink_mask = (ink_map > INK_THRESHOLD * 255).astype(np.uint8)
    # A 1-px anti-aliased line drops under the threshold here and there: bridge its gaps.
    bridge = bridge_size(ink_mask.shape)
    mask = ink_mask if bridge == 1 else cv2.dilate(
        ink_mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (bridge, bridge)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    main = 1 + int(np.argmax(areas))
    x, y, w, h = (int(v) for v in stats[main, :4])
    left, top, right, bottom = x, y, x + w, y + h
    kept = np.zeros(count, bool)
    kept[[0, main]] = True
    candidates = 1 + np.flatnonzero(areas >= PART_AREA * areas[main - 1])
    candidates = candidates[candidates != main]
    if len(candidates) > MAX_PARTS:  # e.g. a page of dots: each pass below would be a pass over all of them
        raise PreprocessError(f"too many separate marks of similar size ({len(candidates) + 1:,}): "
                              "not one digit")
    x0, y0 = stats[candidates, 0], stats[candidates, 1]
    x1, y1 = x0 + stats[candidates, 2], y0 + stats[candidates, 3]
    taken = np.zeros(len(candidates), bool)
    while True:  # grow the kept set by every candidate within reach of it, until none is (≤ MAX_PARTS passes)
        reach = PART_REACH * max(right - left, bottom - top) + PART_REACH_PAGE * max(ink_map.shape)
        gap = np.maximum.reduce([x0 - right, left - x1, y0 - bottom, top - y1, np.zeros_like(x0)])
        new = ~taken & (gap <= reach)
        if not new.any():
            break
        taken |= new
        left, top = min(left, int(x0[new].min())), min(top, int(y0[new].min()))
        right, bottom = max(right, int(x1[new].max())), max(bottom, int(y1[new].max()))
    kept[candidates[taken]] = True
    if not kept.all():
        ink_map[~kept[labels]] = 0
    if bridge == 1:
        return top, bottom, left, right
    # The box of the ink itself, without the bridging margin.
    cols = np.flatnonzero((ink_map[top:bottom, left:right] > INK_THRESHOLD * 255).any(axis=0))
    rows = np.flatnonzero((ink_map[top:bottom, left:right] > INK_THRESHOLD * 255).any(axis=1))
    return top + int(rows[0]), top + int(rows[-1]) + 1, left + int(cols[0]), left + int(cols[-1]) + 1


def bridge_size(shape: tuple[int, ...]) -> int:
    """Odd kernel size that bridges gaps of about 1% of the picture, so one pen stroke is one component
    and not a trail of dashes. The picture's size is its long side, but at most 4× its short one: a
    strip 80,000 px long would otherwise get an 801-px kernel, a minute of CPU for a 1.5 KB PNG
    (pictures up to 4:1 are unchanged)."""
    height, width = shape[:2]
    return 2 * (min(max(height, width), 4 * min(height, width)) // 200) + 1


def scale_into_box(digit: np.ndarray) -> np.ndarray:
    """Cropped float ink → float32 digit with its longer side BOX px, strokes MNIST-wide and saturated."""
    height, width = digit.shape
    scale = BOX / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if box_stroke_width(digit) >= THIN_STROKE:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        digit = cv2.resize(digit, (new_w, new_h), interpolation=interpolation)
    else:
        digit = redraw(digit)
    # MNIST strokes are saturated: a stroke shrunk to grey (or redrawn) gets its full brightness back.
    peak = float(digit.max())
    return digit * (255.0 / peak) if peak > 0 else digit


def normalize_array(images: np.ndarray) -> np.ndarray:
    """uint8 images (28×28 or N×28×28) → float32 (N, 1, 28, 28) with MNIST mean/std, without torch.

    Bit-identical to training/core/tensors.py's `normalize` (float32 divide, subtract, divide in the same
    order; tests check all 256 pixel values), so the ONNX model on the edge sees training's numbers.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise PreprocessError(f"expected uint8 pixels, got {x.dtype}")
    if x.shape[-2:] != (SIZE, SIZE) or x.ndim not in (2, 3):
        raise PreprocessError(f"expected 28x28 images, got shape {tuple(x.shape)}")
    x = x.reshape(-1, 1, SIZE, SIZE).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)


def preprocess_bytes(data: bytes) -> np.ndarray:
    """The serving path for one encoded image: bytes → 28×28 uint8 MNIST-style digit."""
    return to_mnist(load_image(data))
