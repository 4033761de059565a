"""Augmentation on the device: a random rotation, zoom and shift of a whole batch in one grid_sample."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.core.inputs.preprocess import MNIST_MEAN, MNIST_STD
from training.train_config import TrainConfig


def random_affine(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Small random rotation, zoom and shift of a normalised batch, on its device, in one grid_sample."""
    n = x.shape[0]
    rand = torch.rand(n, 4, device=x.device, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = rand[:, 0] * math.radians(cfg.rotate)
    zoom = 1 + rand[:, 1] * cfg.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, rand[:, 2] * 2 * cfg.shift], 1),
                         torch.stack([sin, cos, rand[:, 3] * 2 * cfg.shift], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0; shifting by the background value makes the padding black paper.
    background = -MNIST_MEAN / MNIST_STD
    return F.grid_sample(x - background, grid, align_corners=False) + background
