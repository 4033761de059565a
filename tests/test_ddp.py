"""torchrun: two CPU ranks (gloo) train like one process, rank 0 alone writes, a crash ends the job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import ensure_mnist

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _flags(out: Path, batch_size: int) -> list[str]:
    data_dir = ensure_mnist().parent.parent
    return ["--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "1", "--train-limit", "8000",
            "--val-size", "1000", "--test-limit", "2000", "--batch-size", str(batch_size), "--threads", "1"]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_match_one_process_and_only_rank0_writes(tmp_path):
    # Same global batch (2 × 32 = 64) and so the same number of steps as the single process.
    ddp = _run([*TORCHRUN, "-m", "training.train", *_flags(tmp_path / "ddp", 32)])
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = _run([sys.executable, "-m", "training.train", *_flags(tmp_path / "single", 64)])
    assert single.returncode == 0, single.stderr[-2000:]

    # Rank 0 alone prints results and writes: one set of files, one "wrote" line.
    assert ddp.stdout.count("wrote ") == 1
    assert "global batch 64" in ddp.stdout
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(list((tmp_path / "ddp" / "runs").rglob("events.out.tfevents.*"))) == 1  # TensorBoard: rank 0
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 64

    # The checkpoint holds the plain model's weights (no DDP "module." prefix) and loads as usual.
    ckpt = load_checkpoint(tmp_path / "ddp" / "model.pt")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    model_from_checkpoint(ckpt)

    # Metrics cover the whole test slice, not rank 0's half of it.
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion_matrix"])) == 2000
    assert metrics["test_accuracy"] > 0.9
    assert abs(metrics["test_accuracy"] - single_metrics["test_accuracy"]) < 0.03


def test_a_crashing_rank_fails_the_job_without_hanging(tmp_path):
    script = Path(__file__).with_name("ddp_crash.py")
    start = time.monotonic()
    result = _run([*TORCHRUN, str(script), *_flags(tmp_path / "crash", 32)], timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert time.monotonic() - start < 120  # far below the 5-minute collective timeout
    assert not (tmp_path / "crash" / "model.pt").exists()
