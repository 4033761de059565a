"""Faults around training artifacts: a real Ctrl-C (SIGINT) to `python -m training.train`, then
`--resume`; damaged checkpoints given to `make archive` and `make evaluate`.

tests/test_train.py covers resuming in-process (a KeyboardInterrupt raised from train_epoch) and a
worse run kept as model.candidate.pt; tests/test_serving.py a tampered .mar. Here the signal is
real, sent to the real CLI at whatever point of epoch 2 it lands. Server faults (kill -9 a
worker, SIGTERM under load) are `make chaos` (bench/chaos.py).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from serving import archive
from training.checkpoint import load_checkpoint
from training.run_files import HOLD_ENV, HOLDING_ENV
from training.tools import evaluate

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import save_tiny_checkpoint, training_numbers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# A slice big enough that an epoch lasts seconds (the signal lands inside epoch 2), small enough for
# a test; dropout 0 keeps the comparison with an uninterrupted run simple.
# --amp false: runs in separate processes are compared bit for bit; each would time CPU bf16 on its own.
SLICE = ["--amp", "false", "--device", "cpu", "--threads", "1", "--epochs", "3", "--train-limit", "1500",
         "--val-size", "500", "--test-limit", "500", "--batch-size", "32", "--lr", "0.02", "--model.dropout", "0"]


def train_cli(*args: str | Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    # SIGINT as a terminal leaves it: a suite started in the background (`.ci/run &`) inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler, so the Ctrl-C under test would never arrive.
    return subprocess.Popen([sys.executable, "-m", "training.train", "--quiet", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env_extra or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err




@pytest.mark.slow
def test_ctrl_c_keeps_the_good_model_and_resume_ends_where_an_uninterrupted_run_does(mnist_dir, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    uninterrupted = train_cli(*SLICE, "--data-dir", mnist_dir, "--out-dir", straight)

    # A good model.pt from an earlier run is already in the output folder.
    interrupted.mkdir()
    good = save_tiny_checkpoint(interrupted / "model.pt", test_accuracy=0.999).read_bytes()
    # The run holds after writing last.pt of epoch 1 (training/run_files.py: HOLD_ENV), so SIGINT arrives at
    # that point on any machine, however fast it finishes the remaining epochs; HOLDING_ENV's file says it waits.
    holding = tmp_path / "holding"
    run = train_cli(*SLICE, "--data-dir", mnist_dir, "--out-dir", interrupted,
                    env_extra={HOLD_ENV: "1", HOLDING_ENV: str(holding)})
    deadline = time.monotonic() + 240
    while not holding.exists():  # after last.pt of epoch 1
        assert run.poll() is None and time.monotonic() < deadline, "the run never held after epoch 1"
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    code, out, err = finish(run)
    assert code == 130, err
    assert out == ""
    assert err.strip() == (f"interrupted: the last finished epoch is in {interrupted}/last.pt; "
                           "continue with `make train ARGS=--resume`")
    saved = torch.load(interrupted / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and not saved.get("finished")
    assert (interrupted / "model.pt").read_bytes() == good
    assert sorted(p.name for p in interrupted.iterdir()) == ["last.pt", "model.pt", "runs"]  # runs: TensorBoard

    code, out, err = finish(train_cli("--resume", "--data-dir", mnist_dir, "--out-dir", interrupted))
    assert code == 0, err
    assert code == finish(uninterrupted)[0] == 0
    # The resumed run scores below the 0.999 already published: model.pt stays, the run is a candidate.
    assert (interrupted / "model.pt").read_bytes() == good
    resumed = load_checkpoint(interrupted / "model.candidate.pt")
    expected = load_checkpoint(straight / "model.pt")
    # Its records are the candidate's too: nothing of model.pt's was written over.
    assert [row["epoch"] for row in training_numbers(interrupted, "history.candidate.jsonl")] == [1, 2, 3]
    assert training_numbers(interrupted, "history.candidate.jsonl") == training_numbers(straight)
    assert not (interrupted / "metrics.json").exists() and not (interrupted / "history.jsonl").exists()
    assert resumed["metrics"]["test_accuracy"] == expected["metrics"]["test_accuracy"] > 0.8
    assert all(torch.equal(expected["state_dict"][k], v) for k, v in resumed["state_dict"].items())


# --- damaged checkpoints -------------------------------------------------------------------------

DAMAGE = {  # name: (damage, the exception torch.load raises, named in the message)
    "truncated": (lambda data: data[: len(data) // 2], "OSError"),  # an interrupted copy
    "empty": (lambda data: b"", "EOFError"),
    "garbage": (lambda data: bytes(range(256)) * 8, "UnpicklingError"),
}


def run_cli(cli: str, checkpoint: Path, tmp_path: Path) -> int:
    if cli == "archive":
        return archive.main(["--checkpoint", str(checkpoint), "--model-store", str(tmp_path / "store")])
    return evaluate.main(["--checkpoint", str(checkpoint)])


@pytest.mark.parametrize("cli", ["archive", "evaluate"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line(cli, damage, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", test_accuracy=0.9)
    damaged, raised = DAMAGE[damage]
    checkpoint.write_bytes(damaged(checkpoint.read_bytes()))
    assert run_cli(cli, checkpoint, tmp_path) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {checkpoint} is not a readable checkpoint ({raised}); retrain it\n"
    assert not (tmp_path / "store").exists()


def flip_a_weight_byte(checkpoint: Path) -> None:
    """Flip one byte in the middle of the largest tensor: bit rot, or a bad disk or copy."""
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as z:
        tensor = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[tensor.header_offset + 26 : tensor.header_offset + 30])
    start = tensor.header_offset + 30 + name_length + extra_length  # after the local file header
    data[start + tensor.file_size // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))


@pytest.mark.parametrize("cli", ["archive", "evaluate"])
def test_a_checkpoint_with_a_flipped_byte_is_refused(cli, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", test_accuracy=0.9)
    flip_a_weight_byte(checkpoint)
    with zipfile.ZipFile(checkpoint) as z:
        assert z.testzip() is not None  # the damage is detectable: the stored CRC no longer matches
    assert run_cli(cli, checkpoint, tmp_path) == 1
    assert capsys.readouterr().err.startswith(f"error: {checkpoint}")
