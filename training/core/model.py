"""The CNN, built from a small config so training and the TorchServe handler load the same class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    conv1: int = 32
    conv2: int = 64
    hidden: int = 128
    num_classes: int = 10
    batch_norm: bool = True
    dropout: float = 0.1
    convs: int = 1  # 3×3 convolutions per block before its pooling (2: conv1 → conv1 → pool → conv2 → conv2)

    def validate(self) -> None:
        if min(self.conv1, self.conv2, self.hidden, self.num_classes, self.convs) < 1:
            raise ValueError("model: conv1, conv2, hidden, num_classes and convs must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def _conv_block(c_in: int, c_out: int, batch_norm: bool, convs: int = 1) -> nn.Sequential:
    """[conv → (batch norm) → ReLU] × (convs − 1) → conv → (batch norm) → max-pool → ReLU, as one flat
    Sequential (with convs=1 its state-dict keys are those of every checkpoint written before `convs` existed).

    The last ReLU runs after the pool, on a quarter of the values: max-pool and ReLU commute (ReLU is
    monotone), so outputs and gradients are those of ReLU → pool bit for bit, and so are the state-dict
    keys (neither layer has parameters, so the convs and batch norms keep their indices): checkpoints of
    either order load into the other (tests/test_model.py)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        # With batch norm after it, the conv's bias is redundant (BN's shift replaces it).
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        if i < convs - 1:
            layers.append(nn.ReLU(inplace=True))
    layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Net(nn.Module):
    """conv(1→32) → pool → ReLU → conv(32→64) → pool → ReLU → fc(64·7·7→128) → ReLU → fc(128→10).

    Batch norm after each conv when `batch_norm`; `convs` 3×3 convs per block (the first changes
    the width, the rest keep it).

    Input: normalised images of shape (N, 1, 28, 28). Output: logits of shape (N, num_classes).
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.features = nn.Sequential(
            _conv_block(1, config.conv1, config.batch_norm, config.convs),
            _conv_block(config.conv1, config.conv2, config.batch_norm, config.convs),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.conv2 * 7 * 7, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(config: dict | ModelConfig | None = None) -> Net:
    """Build the network from a ModelConfig or its dict form (as stored in checkpoints and archives)."""
    if config is None:
        config = ModelConfig()
    elif isinstance(config, dict):
        config = ModelConfig(**config)
    return Net(config)


def fuse_batch_norm(model: Net) -> Net:
    """Fold each batch norm into the conv before it (eval mode): one op fewer per conv, same function."""
    for block in model.features:
        for i in range(len(block) - 1):
            if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                block[i] = nn.utils.fusion.fuse_conv_bn_eval(block[i], block[i + 1])
                block[i + 1] = nn.Identity()
    return model
