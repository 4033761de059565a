"""torchrun: two CPU ranks (gloo) train exactly like one process, uneven shards do not hang, a resumed
run ends where an uninterrupted one does, rank 0 alone writes, and a crash ends the job.

Every run pins `--device cpu`: on a GPU host the ranks would otherwise take cuda:0 and cuda:1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import ensure_mnist

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
CRASH = str(Path(__file__).with_name("ddp_crash.py"))
# Exactly the same arithmetic in both runs: no augmentation or dropout draws, and no batch norm (each
# rank would normalise by its own half-batch's statistics, not the global batch's).
# fp32: bf16 autocast (on where the CPU has native bf16) rounds differently at batch 32 and 64.
# Plain MNIST: both runs redraw the same digits (training/printed.py), but with them the two summation
# orders drift apart 100x faster over the 32 steps (largest weight difference 2e-5 instead of 2e-7,
# same test answers), which leaves too little room under the 1e-4 this test holds DDP to on AVX2 kernels.
DETERMINISTIC = ["--augment", "false", "--model.dropout", "0", "--model.batch-norm", "false", "--amp", "false",
                 "--printed-strokes", "0", "--broad-pen", "0"]


def _flags(out: Path, batch_size: int, train_limit: int = 2048, *extra: str) -> list[str]:
    data_dir = ensure_mnist().parent.parent
    return ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "1",
            "--train-limit", str(train_limit), "--val-size", "500", "--test-limit", "1000",
            "--batch-size", str(batch_size), "--threads", "1", "--amp", "false", *extra]


def _run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    # The timeout only stops a hung job (the collective timeout is 5 minutes); it asserts no speed. Its
    # own process group, so that a hung job's ranks are stopped with torchrun, not left behind.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, **env}) as job:
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
            raise
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


def _history(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second", "train_seconds")}
            for row in rows]


def test_two_ranks_train_exactly_like_one_process_and_only_rank0_writes(tmp_path):
    # Same global batch (2 × 32 = 64): rank r takes images r, r+2, … of each 64-image batch of the one
    # process's permutation, and DDP averages the two half-batch gradients into the full batch's.
    ddp = _run([*TORCHRUN, "-m", "training.train", *_flags(tmp_path / "ddp", 32, 2048, *DETERMINISTIC)])
    assert ddp.returncode == 0, ddp.stderr
    single = _run([sys.executable, "-m", "training.train", *_flags(tmp_path / "single", 64, 2048, *DETERMINISTIC)])
    assert single.returncode == 0, single.stderr

    # Rank 0 alone prints results and writes: one set of files, one "wrote" line.
    assert ddp.stdout.count("wrote ") == 1
    assert "global batch 64" in ddp.stdout
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(list((tmp_path / "ddp" / "runs").rglob("events.out.tfevents.*"))) == 1  # TensorBoard: rank 0
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 64

    # The checkpoint holds the plain model's weights (no DDP "module." prefix) and loads as usual.
    ckpt, reference = load_checkpoint(tmp_path / "ddp" / "model.pt"), load_checkpoint(tmp_path / "single" / "model.pt")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    model_from_checkpoint(ckpt)

    # 32 steps of the same global batches: the weights agree to float32 rounding (summation order
    # differs; 2e-7 apart with AVX-512 kernels, 9e-6 capped to AVX2), and so do the predictions on the
    # whole test slice, which covers both ranks' halves: a digit on a knife's edge may flip (one
    # flipped answer moves two cells of the confusion matrix).
    assert ckpt["state_dict"].keys() == reference["state_dict"].keys()
    for name, weight in ckpt["state_dict"].items():
        torch.testing.assert_close(weight, reference["state_dict"][name], rtol=0, atol=1e-4, msg=name)
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion_matrix"])) == 1000
    moved = sum(abs(a - b) for row, other in zip(metrics["confusion_matrix"], single_metrics["confusion_matrix"],
                                                 strict=True) for a, b in zip(row, other, strict=True))
    assert moved <= 4, moved
    assert [row["train_images"] for row in _history(tmp_path / "ddp")] == [2048]


def test_uneven_shards_take_the_same_steps_on_every_rank(tmp_path):
    # 511 images on 2 ranks: 256 + 255. Rank 0 used to take 2 steps of 128 and rank 1 one, and rank 0
    # waited in an all-reduce until the 5-minute timeout. Now the shard is padded to 256 + 256 (as
    # DistributedSampler does) and both ranks take 2 steps per epoch.
    out = tmp_path / "uneven"
    result = _run([*TORCHRUN, "-m", "training.train", *_flags(out, 128, 511, "--epochs", "3")], timeout=240)
    assert result.returncode == 0, result.stderr
    history = _history(out)
    assert [row["train_images"] for row in history] == [512] * 3  # 2 ranks × 2 steps × 128
    # The one-cycle schedule planned exactly the 6 steps taken (more would fail, fewer cut it short).
    schedule = torch.load(out / "last.pt", weights_only=True)["schedule"]
    assert schedule["total_steps"] == schedule["last_epoch"] == 6


def test_a_resumed_two_rank_run_ends_exactly_where_the_uninterrupted_run_does(tmp_path):
    # Augmentation and dropout on: each rank's draws must continue as if never interrupted.
    flags = ["--epochs", "2", "--model.dropout", "0.1", "--augment", "true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = _run([*TORCHRUN, "-m", "training.train", *_flags(straight, 64, 512, *flags)])
    assert result.returncode == 0, result.stderr
    result = _run([*TORCHRUN, CRASH, *_flags(resumed, 64, 512, *flags)], DDP_FAIL_RANKS="0,1", DDP_FAIL_EPOCH="2",
                  DDP_FAIL_WITH="interrupt")
    assert result.returncode != 0 and "interrupted: the last finished epoch is in" in result.stderr
    assert torch.load(resumed / "last.pt", weights_only=True)["epoch"] == 1
    result = _run([*TORCHRUN, "-m", "training.train", "--resume", "--device", "cpu", "--threads", "1",
                   "--data-dir", str(ensure_mnist().parent.parent), "--out-dir", str(resumed)])
    assert result.returncode == 0, result.stderr

    assert [row["epoch"] for row in _history(resumed)] == [1, 2]
    assert _history(resumed) == _history(straight)
    a, b = load_checkpoint(straight / "model.pt"), load_checkpoint(resumed / "model.pt")
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())


def test_a_crashing_rank_fails_the_job_without_hanging(tmp_path):
    start = time.monotonic()
    result = _run([*TORCHRUN, CRASH, *_flags(tmp_path / "crash", 32)], timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert time.monotonic() - start < 240  # the 5-minute collective timeout was not what ended it
    assert not (tmp_path / "crash" / "model.pt").exists()
