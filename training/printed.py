"""Strokes that print and much of the world add to a digit, drawn onto some MNIST training digits.

MNIST was written by American census staff and students: its 1s are a single stroke, its 7s have no
crossbar and its strokes are as wide one way as the other. Fonts, and people elsewhere, draw a 1 with
a flag at the top and often a foot, a 7 with a bar through its stem, and (serif and bold faces)
upright strokes thicker than horizontal ones. A model that never saw them reads a flagged 1 as a 7
and calls a 1 with a foot or a bold serif 9 "not a digit" (`make eval-fonts`). So some training
digits are replaced by themselves with those strokes (`with_printed_strokes`): drawn on the digit
enlarged 4×, in its own stroke width, then brought back to 28×28 by `to_mnist`, the path a served
picture takes. No font is used: the font set stays unseen.
"""

from __future__ import annotations

import cv2
import numpy as np

from training.core.inputs.preprocess import to_mnist
from training.core.inputs.strokes import stroke_width

ZOOM = 4  # strokes are drawn on the digit enlarged 4× (anti-aliased at that scale)...
MARGIN = 7  # ... with 7 MNIST pixels more paper on every side, so no stroke reaches the picture's edge
MAX_PEN = 3  # MNIST pixels a broad pen widens an upright stroke by at most (a bold digit's loops stay open)
MAX_SLANT = 0.25  # horizontal px per vertical px (14°): the 1s a flag is drawn on are about upright


def slant(digit: np.ndarray) -> float:
    """How far the digit leans, in horizontal px per vertical px (its second moments, as deskewing uses)."""
    m = cv2.moments(digit.astype(np.float32))
    return m["mu11"] / m["mu02"] if m["mu02"] else 0.0


def enlarge(digit: np.ndarray) -> np.ndarray:
    """The 28×28 digit enlarged ZOOM× (bicubic, as a drawing at that size) on a MARGIN-wider page, uint8."""
    big = cv2.resize(digit, (28 * ZOOM, 28 * ZOOM), interpolation=cv2.INTER_CUBIC)
    return np.pad(big, MARGIN * ZOOM)


def _axis(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(top end, bottom end, length) of a stroke's long axis, in (x, y), from its ink pixels."""
    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], 1).astype(np.float64)
    centre = points.mean(0)
    _, vectors = np.linalg.eigh(np.cov((points - centre).T))
    direction = vectors[:, -1] * (1 if vectors[1, -1] < 0 else -1)  # the long axis, pointing up
    along = (points - centre) @ direction
    top, bottom = centre + direction * np.percentile(along, 99), centre + direction * np.percentile(along, 1)
    return top, bottom, float(np.linalg.norm(top - bottom))


def _line(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, width: float) -> None:
    shift = 4  # sub-pixel end points
    a, b = (np.rint(p * (1 << shift)).astype(np.int32) for p in (start, end))
    cv2.line(canvas, tuple(int(v) for v in a), tuple(int(v) for v in b), 255, max(1, round(width)),
             cv2.LINE_AA, shift)


def flag_and_foot(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 1 with a flag down to the left from its top, and half the time a horizontal foot, 28×28 uint8."""
    big = enlarge(digit)
    mask = big >= 128
    top, bottom, length = _axis(mask)
    width = stroke_width(mask) * rng.uniform(0.7, 1.0)
    # The flag leaves the top 35-70° to the left of the stem's way down (20-55° below the
    # horizontal on an upright 1), so a slanted 1 gets it at the same angle to its stem.
    down = (bottom - top) / length
    turn = np.radians(rng.uniform(35, 70))
    flag = top + length * rng.uniform(0.2, 0.35) * np.array([down[0] * np.cos(turn) - down[1] * np.sin(turn),
                                                             down[0] * np.sin(turn) + down[1] * np.cos(turn)])
    _line(big, top, flag, width)
    if rng.random() < 0.5:
        half = length * rng.uniform(0.2, 0.35)
        tilt = half * np.tan(np.radians(rng.uniform(-5, 5)))
        foot = np.array([half, tilt])
        _line(big, bottom - foot, bottom + foot, width)
    return to_mnist(big)


def crossbar(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 7 with a short bar across its stem, a little below half its height, 28×28 uint8."""
    big = enlarge(digit)
    mask = big >= 128
    rows = np.flatnonzero(mask.any(axis=1))
    height = rows[-1] - rows[0] + 1
    y = rows[0] + round(height * rng.uniform(0.45, 0.6))
    xs = np.flatnonzero(mask[y])
    if len(xs) == 0:
        return to_mnist(big)
    x = xs.mean()
    half = height * rng.uniform(0.15, 0.25)
    width = stroke_width(mask) * rng.uniform(0.7, 1.0)
    _line(big, np.array([x - half, y]), np.array([x + half, y + half * np.tan(np.radians(rng.uniform(-8, 8)))]),
          width)
    return to_mnist(big)


def broad_pen(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit with its upright strokes thickened and its horizontal ones left thin, as a serif or bold
    face draws them (a broad pen held flat), 28×28 uint8."""
    big = enlarge(digit)
    widen = min(stroke_width(big >= 128) * rng.uniform(0.5, 1.5), MAX_PEN * ZOOM)  # px, both sides together
    length = 2 * round(widen / 2) + 1
    return to_mnist(cv2.dilate(big, np.ones((1, length), np.uint8)))


def with_printed_strokes(images: np.ndarray, labels: np.ndarray, strokes: float, pen: float,
                         seed: int = 0) -> np.ndarray:
    """`images` with some digits replaced by themselves in print's shapes, the same every time for a seed:
    a fraction `strokes` of the upright 1s with a flag (half of them with a foot too) and of the 7s
    with a crossbar, then a fraction `pen` of the other digits, any class, drawn with a broad pen."""
    rng = np.random.default_rng([seed, 17])
    out = images.copy()
    changed = np.zeros(len(images), bool)
    for label, draw in ((1, flag_and_foot), (7, crossbar)):
        index = np.flatnonzero(labels == label)
        if label == 1:  # upright ones only: a flag on a slanted 1 makes the shape of an MNIST 7
            index = index[[abs(slant(images[i])) < MAX_SLANT for i in index]]
        for i in rng.choice(index, round(strokes * len(index)), replace=False):
            out[i], changed[i] = draw(images[i], rng), True
    others = np.flatnonzero(~changed)
    for i in rng.choice(others, round(pen * len(others)), replace=False):
        out[i] = broad_pen(images[i], rng)
    return out
