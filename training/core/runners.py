"""Exported model files as callables: normalised float32 batch (N, 1, 28, 28) → logits (N, 10).

The worker's onnx and int8 variants run `OnnxModel`; the export parity check, the compression table
and the edge comparison load files through `training.tools.export.load_runner`, which dispatches to
these runners (and to a checkpoint for `.pt`), so every number about a format is measured through
the same loading code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

Runner = Callable[[np.ndarray], np.ndarray]


class FormatError(RuntimeError):
    """The file is missing, of an unknown kind, or its runtime is not installed."""


def onnx_session(path: Path, threads: int = 0):
    """An ONNX Runtime session on the CPU with `threads` intra-op threads (0: one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if threads == 1:
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, threads: int = 0) -> Runner:
    """Logits only (output 0); a file may also carry the detector's `features` (training/tools/export.py)."""
    session = onnx_session(path, threads)
    name, first = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([first], {name: np.ascontiguousarray(x, np.float32)})[0]


class OnnxModel:
    """An exported model run by ONNX Runtime, called like the torch module: tensor batch in, logits out.

    A file exported with the detector's `features` output (training/tools/export.py) also answers
    `features_and_logits` from its one run, so the "not a digit" score needs no float model. Only
    for fp32 files (`use_features`): int8 features move the Mahalanobis score too far from the fp32
    statistics it was fitted on (712 of 1,020 verdicts changed in tests/test_handler.py's check).
    The handler's exported variants run this; it lives here because a TorchServe handler module may
    define only one class."""

    def __init__(self, path: Path, threads: int, use_features: bool = True) -> None:
        self.session = onnx_session(path, threads)
        self.input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.has_features = use_features and names[:2] == ["logits", "features"]

    def _run(self, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, {self.input: np.ascontiguousarray(x.cpu().numpy(), np.float32)})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self._run(x, ["logits"])[0])

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        logits, features = self._run(x, ["logits", "features"])
        return torch.from_numpy(features), torch.from_numpy(logits)


def torch_runner(path: Path) -> Runner:
    """A .pt2 file: an AOTInductor package (compiled) or a plain torch.export ExportedProgram."""
    import zipfile

    import torch

    with zipfile.ZipFile(path) as z:
        compiled = any(name.endswith((".so", ".wrapper.cpp")) or "/data/aotinductor/" in name for name in z.namelist())
    static = 0
    if compiled:
        from torch._inductor import aoti_load_package

        module = aoti_load_package(str(path))
        static = int(module.get_metadata().get("static_batch", 0))  # set by training.tools.export.compile_aoti
    else:
        module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if static:  # compiled for one batch size: run in chunks of it, the last one zero-padded
            return np.concatenate([run_fixed(x[i : i + static]) for i in range(0, len(x), static)])
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    def run_fixed(chunk: np.ndarray) -> np.ndarray:
        padded = np.zeros((static, *chunk.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        with torch.inference_mode():
            return module(torch.from_numpy(padded)).float().numpy()[: len(chunk)]

    return run


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
