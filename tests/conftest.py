"""Fixtures shared by the training tests: the real MNIST files, fetched once per session if missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.data import ensure_mnist, load_split, missing_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The verified MNIST data dir ($MNIST_DIR or <repo>/data). A clean CI clone fetches it here, once.

    `make test-fast` sets MNIST_OFFLINE=1: it never downloads, and the tests that need MNIST skip
    (saying so) where `make data` has not run yet.
    """
    root = Path(os.environ.get("MNIST_DIR") or ROOT / "data")
    if os.environ.get("MNIST_OFFLINE") == "1" and missing_files(root):
        pytest.skip(f"MNIST is not in {root} and MNIST_OFFLINE=1 forbids the download: run `make data` first")
    ensure_mnist(root)
    return root


@pytest.fixture(scope="session")
def mnist_test_images(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's 10k test images (uint8, N×28×28) and labels (int64, N), as training reads them."""
    return load_split(mnist_dir, train=False)
