"""Stroke width of a drawing, and redrawing a thin-pen digit with MNIST's stroke (preprocess.py uses both).

MNIST's strokes are ~2.6 px wide in the 20-px box; a 2-px pen line on a 400-px canvas would shrink to a
tenth of a pixel. Relative imports only: this folder is also the edge wheel's mnist_edge.inputs.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np

BOX = 20  # MNIST digits are scaled to fit a 20×20 box inside the 28×28 image
INK_THRESHOLD = 0.15  # fraction of the brightest ink; fainter pixels (noise, JPEG ringing) are background
# Stroke width of the digit once scaled into the 20-px box, in px (2·area / edge pixels, see
# `box_stroke_width`). MNIST's first 2000 training digits, drawn 224 px: 1st percentile 1.55, median 2.63
# (`python -m training.tools.wild --stroke-widths 2000`). Strokes thinner than THIN_STROKE, below MNIST's
# thinnest 1% (a pen line on a big canvas), are redrawn at MNIST's median width; thicker ones are
# kept: thinning a marker digit whose loops are filled in lost more than it gained on the wild set.
THIN_STROKE = 1.2
STROKE_TARGET = 2.6
SUPERSAMPLE = 4  # strokes are redrawn at 4× the 20-px box, then area-averaged down: anti-aliased edges

def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a binary drawing in px: 2·area / edge pixels (a w×L stroke has 2L edge pixels).

    Reads 2 for any stroke up to 2 px wide: thinner ones are all far below MNIST's width anyway.
    """
    area = int(np.count_nonzero(mask))
    if area == 0:
        return 0.0
    inner = cv2.erode(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return 2.0 * area / max(1, area - int(np.count_nonzero(inner)))


def box_stroke_width(digit: np.ndarray) -> float:
    """Stroke width the cropped digit will have once its longer side is BOX px (half-maximum outline).

    Measured on the digit area-averaged to SUPERSAMPLE× the box: the noise and ragged edges of a photo
    would otherwise count as edge pixels and make every stroke look thin.
    """
    scale = min(1.0, BOX * SUPERSAMPLE / max(digit.shape))
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    small = cv2.resize(digit, size, interpolation=cv2.INTER_AREA)
    # Half of a typical stroke-core brightness, not of the maximum, which a noisy photo inflates.
    core = small[small >= INK_THRESHOLD * float(small.max())]
    return stroke_width(small >= 0.5 * float(np.percentile(core, 90))) * BOX / max(small.shape)


def redraw(digit: np.ndarray) -> np.ndarray:
    """Redraw a thin-stroked digit's centre lines with MNIST's median stroke width, longer side BOX px.

    A 2-px pen line on a 400-px canvas shrinks to a tenth of a pixel (a ghost the model never saw).
    It is thinned to its 1-px skeleton at SUPERSAMPLE× the output size (so that a stroke already
    1 px there is unchanged), thickened with a round brush to STROKE_TARGET, then area-averaged
    down, which gives the anti-aliased edges MNIST has.
    """
    k = SUPERSAMPLE
    brush = 2 * round((STROKE_TARGET * k - 1) / 2) + 1  # odd, so the brush is centred on the line
    inner = max(1, BOX * k - brush + 1)  # the skeleton's extent: the brush adds the rest
    scale = inner / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    big = cv2.resize(digit, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    # A shrunk thin line is faint grey: a quarter of the brightest ink still counts as the line.
    lines = skeleton(big >= 0.25 * float(big.max()))
    lines = np.pad(lines.astype(np.uint8), brush // 2 + 1)
    drawn = cv2.dilate(lines, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (brush, brush))).astype(np.float32)
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    drawn = drawn[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] * 255.0
    # The brush widened the drawing (a "1" is now a stroke wide, not a hairline): scale what was drawn.
    scale = BOX / max(drawn.shape)
    size = (max(1, round(drawn.shape[1] * scale)), max(1, round(drawn.shape[0] * scale)))
    return cv2.resize(drawn, size, interpolation=cv2.INTER_AREA)


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: a binary drawing → its 1-px-wide centre lines, connectivity kept."""
    image = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for first in (True, False):
            p = image
            n, ne, e, se = p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:]
            s, sw, w, nw = p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]
            ring = (n, ne, e, se, s, sw, w, nw, n)
            neighbours = sum(v.astype(np.uint8) for v in ring[:8])
            transitions = sum((~a & b).astype(np.uint8) for a, b in itertools.pairwise(ring))
            keep_corner = ~(n & e & s) & ~(e & s & w) if first else ~(n & e & w) & ~(n & s & w)
            remove = p[1:-1, 1:-1] & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & keep_corner
            if remove.any():
                image[1:-1, 1:-1] &= ~remove
                changed = True
        if not changed:
            return image[1:-1, 1:-1]
