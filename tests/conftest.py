"""Fixtures for every test: the real MNIST files (fetched once per session if missing), a throwaway signing key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.data import ensure_mnist, load_split, missing_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def signing_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Archives built by tests are signed with a throwaway key, never the user's (~/.config/mnist-serve).

    Set in the environment, so servers and CLIs started by tests (subprocesses) use it too.
    """
    path = tmp_path_factory.mktemp("keys") / "mnist-serve"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_SERVE_KEY_DIR", str(path))
        mp.delenv("MNIST_SERVE_TRUSTED_DIR", raising=False)
        yield path


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
