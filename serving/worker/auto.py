"""The `auto` variant: at worker start, serve the fastest exact variant on this host, chosen by timing.

Which variant is fastest depends on the CPU, its ISA and the libraries' kernels for it (the in-process
variant table of `make bench-serve` shows the ranking on a host). A ranking written into the archive
would be wrong on some host, so the worker measures on the host it runs on. Only candidates whose
answers equal the fp32 model's on every packed self-check digit (argmax) take part; the timing happens
in `initialize`, so no request ever pays for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from training.core import precision

logger = logging.getLogger(__name__)

# The archive's default. Candidates in order of preference: on a tie within noise the first wins
# (fused needs no second runtime in the worker).
AUTO = "auto"
AUTO_CANDIDATES = ("fused", "onnx")

# Batches of the worker's batch size, each candidate timed in turn (interleaved: a neighbour's
# burst on a shared host slows every candidate alike); the median per candidate decides.
ROUNDS = 15


def exact_candidates(candidates: dict[str, Callable], reference: Callable, digits: torch.Tensor) -> dict[str, Callable]:
    """The candidates whose argmax equals `reference`'s on every one of `digits` (normalised batch)."""
    exact = {}
    for name, model in candidates.items():
        agree, total = precision.agreement(model, reference, digits)
        if agree == total:
            exact[name] = model
        else:
            logger.warning("auto: %s differs from fp32 on %d of %d self-check digits: not a candidate",
                           name, total - agree, total)
    return exact


def median_batch_ms(models: dict[str, Callable], x: torch.Tensor, rounds: int = ROUNDS) -> dict[str, float]:
    """Median milliseconds per call of each model on batch `x`, measured interleaved after one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def choose_fastest(candidates: dict[str, Callable], reference: Callable, digits: torch.Tensor,
                   batch: int) -> tuple[str, dict[str, float]]:
    """(the fastest exact candidate's name, median ms per batch of each exact one); fused if none is exact
    (it is the fp32 network itself, only with batch norm folded in)."""
    exact = exact_candidates(candidates, reference, digits)
    if not exact:
        return "fused", {}
    timings = median_batch_ms(exact, digits[: max(batch, 1)])
    best = min(timings, key=lambda name: (timings[name], AUTO_CANDIDATES.index(name)))
    logger.info("auto: serving %s (median ms per batch of %d: %s)", best, min(batch, len(digits)),
                ", ".join(f"{name} {ms:.3f}" for name, ms in timings.items()))
    return best, timings
