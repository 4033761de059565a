"""Images that are not digits, to measure the "not a digit" score: Fashion-MNIST, noise, textures, text, blank.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (`make system-deps`), which
installs the original gzipped IDX files in /usr/share/datasets/fashion-mnist (override with
$FASHION_MNIST_DIR). Debian recompressed them, so the .gz files differ from upstream's; what is
verified is the decompressed content, whose MD5s match the ones upstream publishes
(zalandoresearch/fashion-mnist README; 8181f547... for t10k-images) and whose SHA-256s are below.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from training.data import DataError

FASHION_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_SHA256 = {  # of the decompressed IDX files
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def fashion_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR") or FASHION_DEFAULT_DIR)


def _read_idx(folder: Path, name: str) -> np.ndarray:
    path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
    if path is None:
        raise DataError(f"Fashion-MNIST file {name} not found in {folder}: install the Debian package "
                        "dataset-fashion-mnist (`make system-deps`) or set FASHION_MNIST_DIR")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if hashlib.sha256(raw).hexdigest() != FASHION_SHA256[name]:
        raise DataError(f"{path} does not match its SHA-256 (training/tools/ood_data.py): corrupt or another release")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion(train: bool = False, folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as uint8 (N, 28, 28) and int64 labels, verified; DataError if absent or altered."""
    folder = folder or fashion_dir()
    prefix = "train" if train else "t10k"
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def noise_images(n: int, seed: int = 0) -> np.ndarray:
    """Uniform random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def texture_images(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    """Photo-like texture: blurred noise with a lighting gradient, as from a camera pointed at a wall or fabric."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.normal(0, 1, (size, size)).astype(np.float32)
        base = np.asarray(cv2.GaussianBlur(base, (0, 0), sigmaX=float(rng.uniform(1.5, 4))), np.float32)
        ramp = np.linspace(0, float(rng.uniform(0.5, 2)), size, dtype=np.float32)
        image = base / (base.std() + 1e-6) + ramp[None, :] * rng.choice([-1, 1])
        image = (image - image.min()) / (np.ptp(image) + 1e-6) * 255
        out.append(cv2.resize(image, (28, 28), interpolation=cv2.INTER_AREA))
    return np.rint(np.stack(out)).astype(np.uint8)


def text_images(n: int, seed: int = 0) -> np.ndarray:
    """Letters and short words in white on black, 28×28: writing that is not a digit."""
    rng = np.random.default_rng(seed)
    words = ["A", "B", "K", "M", "R", "W", "X", "hi", "ok", "no", "abc", "Hello", "?", "&", "#"]
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX]
    out = []
    for i in range(n):
        word = words[i % len(words)]
        canvas = np.zeros((112, 112), np.uint8)
        font = fonts[int(rng.integers(len(fonts)))]
        (w, _), _ = cv2.getTextSize(word, font, 1.0, 6)
        scale = min(3.0, 100 / w)  # as large as fits the canvas
        (w, h), _ = cv2.getTextSize(word, font, scale, 6)
        origin = ((112 - w) // 2, (112 + h) // 2)
        cv2.putText(canvas, word, origin, font, scale, 255, int(rng.integers(5, 9)), cv2.LINE_AA)
        out.append(cv2.resize(canvas, (28, 28), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def synthetic_sets(n: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """The non-Fashion out-of-distribution sets, each n images of 28×28 uint8."""
    return {"noise": noise_images(n, seed), "texture": texture_images(n, seed), "text": text_images(n, seed)}
