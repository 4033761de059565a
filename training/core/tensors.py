"""uint8 digits → the normalised torch batch the model takes: the torch half of the preprocessing.

Kept apart from training/core/inputs/preprocess.py so that file stays importable without torch (the edge client
in edge/ ships it with ONNX Runtime only). `normalize` runs on any device, which training needs:
its whole dataset sits on the GPU when there is one.
"""

from __future__ import annotations

import numpy as np
import torch

from training.core.inputs.preprocess import MNIST_MEAN, MNIST_STD, SIZE, PreprocessError


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (28×28 or N×28×28, array or tensor) → float32 (N, 1, 28, 28) with MNIST mean/std."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise PreprocessError(f"expected uint8 pixels, got {x.dtype}")
    if x.shape[-2:] != (SIZE, SIZE) or x.dim() not in (2, 3):
        raise PreprocessError(f"expected 28x28 images, got shape {tuple(x.shape)}")
    x = x.reshape(-1, 1, SIZE, SIZE).float().div_(255.0)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD)
