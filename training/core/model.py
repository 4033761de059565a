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
    # Each block's last batch norm after its pool (conv → pool → BN → ReLU): batch norm and ReLU on a quarter
    # of the values, and a different model (BN's statistics are those of the pooled maps). False in
    # checkpoints written before the field existed; configs/train.yaml turns it on.
    pool_first: bool = False

    def validate(self) -> None:
        if min(self.conv1, self.conv2, self.hidden, self.num_classes, self.convs) < 1:
            raise ValueError("model: conv1, conv2, hidden, num_classes and convs must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def _conv_block(c_in: int, c_out: int, batch_norm: bool, convs: int = 1, pool_first: bool = False) -> nn.Sequential:
    """[conv → (batch norm) → ReLU] × (convs − 1) → conv → (batch norm) → max-pool → ReLU, as one flat
    Sequential (with convs=1 its state-dict keys are those of every checkpoint written before `convs` existed).
    `pool_first`: the last conv's batch norm after the pool instead (conv → max-pool → (batch norm) → ReLU).

    The last ReLU runs after the pool, on a quarter of the values: max-pool and ReLU commute (ReLU is
    monotone), so outputs and gradients are those of ReLU → pool bit for bit, and so are the state-dict
    keys (neither layer has parameters, so the convs and batch norms keep their indices): checkpoints of
    either ReLU order load into the other (tests/test_model.py). `pool_first` is another model: its batch
    norm sits one index later, and a checkpoint says which it holds (model_config)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        # With batch norm after it, the conv's bias is redundant (BN's shift replaces it).
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=not batch_norm))
        last = i == convs - 1
        if last and pool_first:
            layers.append(nn.MaxPool2d(2))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    if not pool_first:
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Net(nn.Module):
    """conv(1→32) → pool → ReLU → conv(32→64) → pool → ReLU → fc(64·7·7→128) → ReLU → fc(128→10).

    Batch norm after each conv when `batch_norm` (after the pool, for a block's last conv, when
    `pool_first`); `convs` 3×3 convs per block (the first changes the width, the rest keep it).

    Input: normalised images of shape (N, 1, 28, 28). Output: logits of shape (N, num_classes).
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.features = nn.Sequential(
            _conv_block(1, config.conv1, config.batch_norm, config.convs, config.pool_first),
            _conv_block(config.conv1, config.conv2, config.batch_norm, config.convs, config.pool_first),
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
    """Fold each batch norm into the conv before it (eval mode): one op fewer per conv, same function.

    A batch norm after a max-pool (`pool_first`) folds too where it scales every channel by a positive
    factor (then max(a·x + b) = a·max(x) + b); a channel scaled by a negative one would turn the max into a
    min, so such a batch norm stays, and the model computes the same either way."""
    for block in model.features:
        for i in range(len(block) - 1):
            if not isinstance(block[i], nn.Conv2d):
                continue
            after_pool = isinstance(block[i + 1], nn.MaxPool2d) and i + 2 < len(block)
            j = i + 2 if after_pool else i + 1
            bn = block[j]
            if not isinstance(bn, nn.BatchNorm2d) or (after_pool and not _scales_positive(bn)):
                continue
            block[i] = nn.utils.fusion.fuse_conv_bn_eval(block[i], bn)
            block[j] = nn.Identity()
    return model


def _scales_positive(bn: nn.BatchNorm2d) -> bool:
    return bn.weight is None or bool((bn.weight > 0).all())
