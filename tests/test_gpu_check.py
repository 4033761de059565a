"""`make gpu-check` without a GPU: a clear one-line refusal and a non-zero status, at once (never a hang)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: `make gpu-check` measures it instead")
def test_gpu_check_refuses_in_one_line_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU visible (torch ")
    assert lines[0].endswith("nothing to measure; run it on a host with an NVIDIA GPU")
