"""Fixtures and helpers shared by test_archive.py, test_handler.py and test_serving.py.

Each test module registers it with `pytest_plugins = ["serving_fixtures"]` (so each fixture exists
once per session) and imports the helpers it uses by name; pytest puts tests/ on sys.path.
Two checkpoints: a tiny untrained one (instant, for the archive and handler mechanics; answers are
compared with the same weights run offline) and one trained briefly on a slice of MNIST with
configs/train.yaml, made once per session (for real digits).
MNIST itself comes from conftest.py's `mnist_dir` and `mnist_test_images` fixtures.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from serving.archive import Archive, build_archive
from training import config as cfglib
from training.checkpoint import atomic_save, load_checkpoint, make_checkpoint, model_from_checkpoint
from training.core.model import ModelConfig, Net
from training.core.tensors import normalize
from training.loop import fit
from training.run_options import RunOptions
from training.train_config import DEFAULT_CONFIG, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_7 = ROOT / "serving" / "samples" / "7.png"
METRICS_YAML = ROOT / "configs" / "metrics.yaml"
# Not the default architecture, so an archive that lost its model_config would fail to load it.
TINY_MODEL = ModelConfig(conv1=4, conv2=8, hidden=16, dropout=0.0)
# configs/train.yaml shrunk: 12k images × 2 epochs on the CPU scores ~98% on the first 1000 test
# images in about 10 s. One thread: on a small shared box two threads fighting other jobs for the
# cores made the same run 7x slower. amp off: on CPUs with native bf16 the bf16-or-fp32 choice is a timing
# (training/core/precision.py), and the tests that check this model's answers must see the same model everywhere.
# Plain MNIST, no digits redrawn in print's shapes (training/printed.py): so brief a run learns a flag, a
# foot and a crossbar as digit strokes before it learns much else, and its "not a digit" detector
# (threshold from 500 digits) then passes a flip-flop and, with the broad pen, 30% of Fashion-MNIST
# (69.5% rejected, 100.0% without). tests/test_fonts.py trains this slice with them on its own.
# Batch norm before the pool (model.pool_first false): so brief a run of the pool-first default passed a
# Fashion-MNIST sandal as a digit (tests/test_explanations.py), though the fully trained default rejects
# more of Fashion-MNIST than the model before it (`make trust-eval`). Pool-first models are served in every
# exact variant by tests/test_handler.py's architecture test, and trained by tests/test_train.py (its slice
# keeps configs/train.yaml's model).
TRAIN_SLICE = {"device": "cpu", "epochs": 2, "train_limit": 12_000, "val_size": 500, "test_limit": 1000,
               "threads": 1, "amp": False, "printed_strokes": 0.0, "broad_pen": 0.0, "model": {"pool_first": False}}


def encode_png(image: np.ndarray | torch.Tensor) -> bytes:
    ok, buffer = cv2.imencode(".png", np.asarray(image, dtype=np.uint8))
    assert ok
    return buffer.tobytes()


def save_tiny_checkpoint(path: Path, seed: int = 0, test_accuracy: float = 0.5,
                         model: ModelConfig = TINY_MODEL) -> Path:
    """An untrained TINY_MODEL (or `model`) in the checkpoint format training.train writes."""
    torch.manual_seed(seed)
    atomic_save(make_checkpoint(Net(model).eval(), config={}, metrics={"test_accuracy": test_accuracy}), path)
    return path


def training_numbers(out: Path, history: str = "history.jsonl") -> list[dict]:
    """history.jsonl (or a candidate's history.candidate.jsonl) without the timings, which differ between runs."""
    rows = [json.loads(line) for line in (out / history).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second", "train_seconds")}
            for row in rows]


def failing_replace(monkeypatch, fail_on: int) -> list:
    """os.replace that raises on its `fail_on`-th call (as a full disk or a kill would stop it there)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == fail_on:
            raise OSError(28, "No space left on device (injected)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def settled(read, quiet: float = 3.0, timeout: float = 30.0):
    """`read()` once its value has not changed for `quiet` seconds. The handler emits its counters at most
    once a second (serving/worker/metric_buffer.py), so counts that earlier requests left pending land in that
    time: a test that reads a counter before its own requests must wait for them first."""
    value, since = read(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if (now := read()) != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"still changing after {timeout} s: {value}")


def unpack(mar: Path, dest: Path) -> Path:
    """What TorchServe does with a .mar before loading it: extract it into a folder of its own."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest


def offline_probabilities(checkpoint: Path, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The training path: checkpoint → model, uint8 28×28 digits → normalize → softmax(logits / temperature)."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    with torch.inference_mode():
        return torch.softmax(model(normalize(images)) / ckpt.get("temperature", 1.0), dim=1)


def train_slice(mnist_dir: Path, out_dir: Path, slice_: dict[str, Any] | None = None) -> Path:
    """configs/train.yaml shrunk to `slice_` (default TRAIN_SLICE), trained through the real code path."""
    cfg = cfglib.apply(TrainConfig(), cfglib.load_yaml(DEFAULT_CONFIG))
    cfg = cfglib.apply(cfg, {**(TRAIN_SLICE if slice_ is None else slice_), "data_dir": str(mnist_dir),
                             "out_dir": str(out_dir)})
    threads = torch.get_num_threads()
    try:
        fit(cfg, RunOptions(quiet=True))
    finally:
        torch.set_num_threads(threads)  # fit sets the process-wide thread count
    return out_dir / "model.pt"


@pytest.fixture(scope="session")
def trained_checkpoint(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/train.yaml shrunk to TRAIN_SLICE, trained once per session."""
    return train_slice(mnist_dir, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def trained_archive(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """The trained checkpoint as model_store/mnist.mar (version 1.0); tests must not modify it."""
    return build_archive(trained_checkpoint, tmp_path_factory.mktemp("trained-store"), "mnist", "1.0")


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Archive]:
    """(checkpoint, archive) for the tiny untrained model; tests must not modify either."""
    base = tmp_path_factory.mktemp("tiny")
    checkpoint = save_tiny_checkpoint(base / "model.pt")
    return checkpoint, build_archive(checkpoint, base / "store", "mnist", "1.0")


def manifest_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def trained_server(trained_archive, tmp_path_factory):
    """A real TorchServe on free loopback ports serving the trained archive, token auth on."""
    from serving.server import TorchServe

    ts = TorchServe.on_free_ports(tmp_path_factory.mktemp("serve"), trained_archive.path.parent,
                                  model_name="mnist", auth=True)
    try:
        ts.start(timeout=180)
        yield ts
    finally:
        ts.stop()
