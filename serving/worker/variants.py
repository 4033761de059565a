"""The model as a worker runs it: the archive's variant (fused, bf16, onnx, int8...) on its device.

Benchmarks and fault scripts call `serving_model` and `to_model_input` too, so their offline answers
are computed exactly the way the server computes them. Importing this needs no TorchServe
(`make archive` reads the variant names here).
"""

from __future__ import annotations

import numpy as np
import torch

from training.core import precision
from training.core.model import ModelConfig, fuse_batch_norm
from training.core.tensors import normalize

# Load-time transforms of the eager model, chosen per archive (`make archive ARGS="--variant ..."`).
# onnx and int8 run a file the archive carries (training/tools/export.py) with ONNX Runtime: int8 is static
# int8 of every conv and linear. int8-legacy is torch's deprecated dynamic quantisation of the
# linears only, kept as a labelled row for comparison (docs: Compression and edge). bf16 is fused
# in bfloat16 where the CPU (AMX / AVX512-BF16) or GPU runs it natively. auto (the archive's default)
# carries the onnx file and picks fused or onnx at worker start by timing them (serving/worker/auto.py).
VARIANTS = ("auto", "eager", "fused", "bf16", "onnx", "int8", "int8-legacy")


ONNX_FILES = {"auto": "model.onnx", "onnx": "model.onnx", "int8": "model_int8.onnx"}


# ONNX Runtime here and packed int8 weights run only on the CPU: on a GPU host such a worker stays on
# the CPU (not a reload loop).
CPU_ONLY_VARIANTS = ("onnx", "int8", "int8-legacy")


# Variants that approximate the fp32 model: each carries SELF_CHECK_FILE (MNIST test digits, written by
# serving/archive.py) and a worker serves it only if it agrees with the fp32 model on at least
# SELF_CHECK_MIN_AGREEMENT of them on this host (int8 and bf16 kernels differ by CPU; a broken file too).
APPROXIMATE_VARIANTS = ("auto", "bf16", "onnx", "int8", "int8-legacy")


SELF_CHECK_FILE = "selfcheck.npy"


SELF_CHECK_MIN_AGREEMENT = 0.99  # 512 digits: at most 5 may differ (the shipped int8 differs on 0-2 of 10k/512)


# fused (batch norm folded into the convs): the exact network offline tools compute with, and what a
# worker serves for an archive without a variant in its model.json (older archives).
DEFAULT_VARIANT = "fused"


# What `make archive` packs by default: the fastest exact variant on the serving host (auto.py).
ARCHIVE_DEFAULT_VARIANT = "auto"


def optimize(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Apply the archive's load-time variant to the eval-mode model (see serving/archive.py)."""
    if variant == "fused":  # fold each batch norm into the conv before it: one op fewer per block
        model = fuse_batch_norm(model)
    elif variant == "int8-legacy":  # deprecated in torch 2.14: dynamic int8 of the fully connected layers only
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif variant == "bf16":  # fused, then bf16 weights: native on AMX / AVX512-BF16 CPUs and on GPUs
        model = precision.BF16Model(optimize(model, "fused"))
    elif variant != "eager":
        raise ValueError(f"unknown model variant {variant!r}")
    return model


def runnable_variant(variant: str, device: torch.device, model_config: dict | None = None
                     ) -> tuple[str, torch.device, str]:
    """The variant and device a worker actually uses, and why if that is not what the archive asked for
    (bf16 on a CPU: timed on the archive's network, `model_config`; an ensemble's: its first member's)."""
    if variant == "auto" and device.type != "cpu":
        return "fused", device, "variant auto times the CPU variants: serving fused on the GPU"
    if variant in CPU_ONLY_VARIANTS and device.type != "cpu":
        return variant, torch.device("cpu"), f"variant {variant} runs on the CPU only"
    if variant == "bf16" and device.type == "cpu" and not precision.use_cpu_bf16(
            train=False, config=ModelConfig(**model_config) if model_config is not None else None):
        # Emulated bf16 is slower than fp32: serve the same fused network in fp32 instead.
        return "fused", device, "bf16 is not faster than fp32 on this CPU: serving fused (fp32)"
    return variant, device, ""


def serving_model(model: torch.nn.Module, variant: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model as a worker runs it: eval mode, the archive's variant, channels_last, on `device`.

    channels_last: oneDNN's convolutions run faster in it on CPU (docs: Benchmarks). Inputs
    must be channels_last too (`to_model_input`). Benchmarks and fault scripts call this as well, so
    their offline answers are computed exactly the way the server computes them.
    """
    return optimize(model.eval(), variant).to(device, memory_format=torch.channels_last)


def to_model_input(digits: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """28×28 uint8 digits → the normalised, channels_last batch `serving_model` expects."""
    # uint8 crosses to the device (4× fewer bytes than float) and is normalised there.
    return normalize(torch.as_tensor(digits).to(device)).contiguous(memory_format=torch.channels_last)
