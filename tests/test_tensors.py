"""The torch-free preprocessing (edge/) and the torch one (training, serving) give the same numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.core.inputs.preprocess import PreprocessError, normalize_array
from training.core.tensors import normalize

ROOT = Path(__file__).resolve().parent.parent


def test_normalize_array_is_bit_identical_to_normalize_for_every_pixel_value():
    every_value = np.arange(256, dtype=np.uint8)
    images = np.stack([np.resize(np.roll(every_value, k), (28, 28)) for k in range(4)])
    assert np.array_equal(normalize_array(images), normalize(images).numpy())
    assert normalize_array(images).dtype == np.float32
    assert normalize_array(images[0]).shape == (1, 1, 28, 28)


def test_normalize_array_on_mnist_test_images_is_what_training_feeds_the_model(mnist_test_images):
    images = mnist_test_images[0].numpy()
    assert np.array_equal(normalize_array(images), normalize(torch.from_numpy(images)).numpy())


@pytest.mark.parametrize(("images", "message"), [
    (np.zeros((28, 28), np.float32), "uint8"),
    (np.zeros((27, 28), np.uint8), "28x28"),
    (np.zeros((1, 1, 28, 28), np.uint8), "28x28"),
])
def test_normalize_array_refuses_other_dtypes_and_shapes(images, message):
    with pytest.raises(PreprocessError, match=message):
        normalize_array(images)


def test_preprocess_imports_without_torch():
    """edge/ ships training/core/inputs/ to machines without torch: preprocess.py and decode.py never import it."""
    code = ("import sys; sys.modules['torch'] = None; import training.core.inputs.preprocess as preprocess; "
            "print(preprocess.normalize_array(preprocess.to_mnist(preprocess.np.eye(28, dtype='uint8') * 255)).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, 1, 28, 28)"
