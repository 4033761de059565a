"""L1 regularisation (`l1: 1e-5`): a penalty on the absolute weights, added to the loss.

Weight decay (L2) shrinks every weight in proportion to its size; L1 pulls each weight toward
zero by the same amount whatever its size, so small, useless weights reach zero and the network
becomes sparse. Only conv and linear weights are penalised: biases and batch-norm scales set
offsets and gains, and pulling those to zero would only fight the normalisation.
"""

from __future__ import annotations

import torch


def penalised(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weight tensors L1 applies to: every parameter with two or more dimensions."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def l1_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Sum of |w| over the penalised weights (multiply by the config's `l1` before adding to the loss)."""
    return torch.stack([p.abs().sum() for p in penalised(model)]).sum()
