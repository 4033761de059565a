"""A deterministic "user handwriting" set: MNIST test digits in a style the model was not trained on.

A slanted, thin pen: each digit is drawn 4× larger, sheared to the right by SLANT and eroded (a pen
about a third as wide), then shrunk back to 28×28 and passed through the handler's own `to_mnist`.
Neither shift is undone by serving: a 28×28 upload keeps its strokes as they are (only its paper and
ink levels are set), and nothing in preprocessing deskews. Training's augmentation rotates by ±10° but
never shears, and its broad-pen redrawing (training/printed.py) thickens, never thins.
"""

from __future__ import annotations

import cv2
import numpy as np

from training.core.inputs.preprocess import PreprocessError, to_mnist

SLANT = 0.45  # horizontal shear: x += SLANT * (centre row - y), a right-leaning hand
UPSCALE = 4
PEN = 7  # erosion kernel at 4×: strokes lose about 1.5 px of their ~2.5 px width at 28×28


def user_style(digit: np.ndarray) -> np.ndarray | None:
    """One 28×28 MNIST digit in the user's hand, as the model sees it; None where too little ink is left."""
    side = digit.shape[0] * UPSCALE
    big = cv2.resize(digit, (side, side), interpolation=cv2.INTER_CUBIC)
    centre = side / 2
    shear = np.array([[1, -SLANT, SLANT * centre], [0, 1, 0]], dtype=np.float32)
    big = cv2.warpAffine(big, shear, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
    big = cv2.erode(big, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (PEN, PEN)))
    small = cv2.resize(big, (digit.shape[1], digit.shape[0]), interpolation=cv2.INTER_AREA)
    try:
        return to_mnist(small)
    except PreprocessError:
        return None


def user_set(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(styled images, labels, their indices into `images`) in a seeded order; digits that vanish are left out."""
    order = np.random.default_rng(seed).permutation(len(images))
    styled = [(user_style(images[i]), i) for i in order]
    kept = [(x, i) for x, i in styled if x is not None]
    index = np.array([i for _, i in kept], dtype=np.int64)
    return np.stack([x for x, _ in kept]), labels[index], index
