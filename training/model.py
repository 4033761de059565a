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

    def validate(self) -> None:
        if min(self.conv1, self.conv2, self.hidden, self.num_classes) < 1:
            raise ValueError("model: conv1, conv2, hidden and num_classes must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    # With batch norm after it, the conv's bias is redundant (BN's shift replaces it).
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class Net(nn.Module):
    """conv(1→32) → ReLU → pool → conv(32→64) → ReLU → pool → fc(64·7·7→128) → ReLU → fc(128→10).

    Input: normalised images of shape (N, 1, 28, 28). Output: logits of shape (N, num_classes).
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.features = nn.Sequential(
            _conv_block(1, config.conv1, config.batch_norm),
            _conv_block(config.conv1, config.conv2, config.batch_norm),
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
    """Fold each batch norm into the conv before it (eval mode): one op fewer per block, same function."""
    for block in model.features:
        if isinstance(block[1], nn.BatchNorm2d):
            block[0] = nn.utils.fusion.fuse_conv_bn_eval(block[0], block[1])
            block[1] = nn.Identity()
    return model
