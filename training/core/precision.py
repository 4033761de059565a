"""Native bf16 on the CPU: use it where the CPU has it (AMX, AVX512-BF16) and it is faster, fp32 elsewhere.

oneDNN runs bf16 convolutions and matmuls natively on AMX / AVX512-BF16 CPUs and emulates them
(slower than fp32) on the rest, so "supported" alone is not enough: `cpu_bf16_speedup` times the
real work once per process and the callers fall back to fp32 unless bf16 wins by a margin. Used by
training (autocast on CPU) and by the serving `bf16` variant (serving/worker/handler.py).
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from training.core.model import ModelConfig

# bf16 must beat fp32 by this factor: a tie is noise on a shared machine and costs accuracy for nothing.
MIN_SPEEDUP = 1.1


def mkldnn_bf16_supported() -> bool:
    """What oneDNN reports: the CPU has bf16 instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _best_of(a, b, repeats: int = 3) -> tuple[float, float]:
    """Best time of each of two functions, run alternately so a burst of load from elsewhere hits both."""
    for fn in (a, b, a, b):  # first calls: allocations and oneDNN primitive creation, not timed
        fn()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


@cache
def cpu_bf16_speedup(train: bool = True, config: ModelConfig | None = None, batch: int = 32) -> float:
    """fp32 time / bf16-autocast time of a forward (and backward if `train`) pass on this CPU; 0.0 without bf16.

    The best of 3 repeats of each, alternating: ~0.5 s on an idle 2-core machine, seconds under load.
    `config`: the network timed (default: ModelConfig()'s); once per process and architecture.
    """
    if not mkldnn_bf16_supported():
        return 0.0
    from training.core.model import ModelConfig, Net

    net = Net(config or ModelConfig()).train(train).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
            out = net(x).float().sum()
        if train:
            out.backward()
            net.zero_grad(set_to_none=True)

    fp32, bf16 = _best_of(lambda: step(False), lambda: step(True))
    return fp32 / bf16


# The training decision, once per run; DDP ranks agree on it (decide_cpu_bf16). The speedup behind it is
# what describe() reports: the timing of the network being trained, not another one's.
_decided: bool | None = None
_speedup: float | None = None
_config: ModelConfig | None = None


def use_cpu_bf16(train: bool = True, config: ModelConfig | None = None) -> bool:
    """Autocast to bf16 on this CPU: oneDNN has native bf16 and it beats fp32 by MIN_SPEEDUP (timed on
    `config`'s network; in training, the run's decision)."""
    if train and _decided is not None:
        return _decided
    return cpu_bf16_speedup(train, config) >= MIN_SPEEDUP


def decide_cpu_bf16(agree=None, keep: bool | None = None, config: ModelConfig | None = None) -> bool:
    """Time bf16 once for training, on the network trained (`config`); `agree` (dist.all_reduce) makes every
    rank take rank-min of the answers, so a noisy timing on one rank cannot leave the ranks training in
    different precisions. `keep`: a decision already made (a resumed run's), used as is: the same precision
    before and after a resume."""
    global _decided, _speedup, _config
    # A kept decision stands in as a speedup just at (or, for fp32, below) the bar.
    speedup = cpu_bf16_speedup(True, config) if keep is None else (MIN_SPEEDUP if keep else 0.0)
    if agree is not None:  # the slowest rank's: every rank decides, and reports, the same
        slowest = torch.tensor([speedup], dtype=torch.float64)
        agree(slowest, op=torch.distributed.ReduceOp.MIN)
        speedup = float(slowest.item())
    _decided, _speedup, _config = speedup >= MIN_SPEEDUP, speedup if keep is None else None, config
    return _decided


def describe(device: torch.device, enabled: bool) -> str:
    """The precision a run trains in, for the log line and metrics.json."""
    if not enabled:
        return "fp32 (amp off)"
    if device.type == "cuda":
        return "bf16 autocast"
    if device.type != "cpu":
        return "fp32"
    if not mkldnn_bf16_supported():
        return "fp32 (no native bf16 on this CPU)"
    speedup = _speedup if _speedup is not None else cpu_bf16_speedup(True, _config)  # a kept decision: time it
    return f"bf16 autocast ({speedup:.2f}x fp32)" if use_cpu_bf16() else f"fp32 (bf16 only {speedup:.2f}x fp32)"


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast for `device` when `enabled` (the config's `amp`): always on CUDA, on CPU only if faster."""
    on = enabled and (device.type == "cuda" or (device.type == "cpu" and use_cpu_bf16(train=True)))
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=on)


class BF16Model(nn.Module):
    """A model with bf16 weights, fp32 in and out (the serving `bf16` variant): callers and the softmax see
    the types they see for fp32. Here, not in serving/worker/handler.py: TorchServe wants one class in a handler."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


class SelfCheckError(RuntimeError):
    """An approximate variant does not give the fp32 model's answers on this host: the worker must not serve
    it (serving/worker/handler.py). Here, not in the handler: TorchServe wants one class in a handler module."""


def agreement(model, reference, x: torch.Tensor, batch: int = 64) -> tuple[int, int]:
    """(inputs on which `model` and `reference` pick the same class, inputs): the variants' self-check."""
    same = 0
    with torch.inference_mode():
        for chunk in x.split(batch):
            same += int((model(chunk).float().argmax(1) == reference(chunk).float().argmax(1)).sum())
    return same, len(x)


# The /proc/cpuinfo flags that decide which int8 and bf16 kernels run (dot products: VNNI; bf16; AMX).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The ISA_FLAGS this CPU reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next(t for t in text.splitlines() if t.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [flag for flag in ISA_FLAGS if flag in have]


def cpu_isa() -> str:
    """cpu_flags() for an error line: e.g. "avx2, avx512f, avx512_vnni"."""
    return ", ".join(cpu_flags()) or "no AVX2"
