"""Integrated Gradients: why the model chose this digit (the worker's /explanations branch).

Method: Integrated Gradients on the predicted class's logit, from a black image (every pixel 0,
the MNIST background). Black is the baseline because on MNIST it *is* "no ink": each attribution
then says how much that pixel's ink moved the logit, and the attributions add up to
logit(input) − logit(blank page) (IG's completeness). It is also what the deletion test
(training/tools/explain.py) removes a pixel to, so the explanation and its test agree on what
"absent" means. A blurred-input baseline would credit only edges and leave thick strokes unexplained.
Captum is imported on first use.
"""

from __future__ import annotations

import torch

from training.core.tensors import normalize

IG_STEPS = 32  # Riemann steps; the completeness gap at 32 is in docs: Trust


def black_baseline(x: torch.Tensor) -> torch.Tensor:
    """A black image, normalised exactly as a black input pixel is (so input − baseline is exactly 0 there)."""
    black = normalize(torch.zeros(1, 28, 28, dtype=torch.uint8))
    return black.to(x.device).expand_as(x).clone()


def integrated_gradients(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                         steps: int = IG_STEPS) -> torch.Tensor:
    """(N, 28, 28) attributions of the `target` logits for normalised inputs x (N, 1, 28, 28)."""
    from captum.attr import IntegratedGradients

    method = IntegratedGradients(model)
    chunk = 8  # images per backward pass: 8 × steps interpolated inputs bound the memory
    parts = [method.attribute(x[i : i + chunk], baselines=black_baseline(x[i : i + chunk]),
                              target=target[i : i + chunk], n_steps=steps, internal_batch_size=chunk * steps)
             for i in range(0, len(x), chunk)]
    return torch.cat(parts).detach().float().reshape(-1, 28, 28)
