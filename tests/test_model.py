"""training.model: the CNN's shape, size and layer order, built the same way from a config or its dict."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from training.model import ModelConfig, Net, build_model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n", [1, 7])
def test_logits_have_shape_n_by_10(n):
    model = build_model().eval()
    with torch.no_grad():
        logits = model(torch.zeros(n, 1, 28, 28))
    assert logits.shape == (n, 10) and logits.dtype == torch.float32


def test_parameter_count_of_the_default_model():
    conv1 = 1 * 32 * 3 * 3  # no bias: batch norm's shift replaces it
    bn1 = 2 * 32  # scale and shift
    conv2 = 32 * 64 * 3 * 3
    bn2 = 2 * 64
    fc1 = 64 * 7 * 7 * 128 + 128  # 3136 → 128, with bias
    fc2 = 128 * 10 + 10
    assert conv1 + bn1 + conv2 + bn2 + fc1 + fc2 == 421_738
    assert parameter_count(build_model()) == 421_738


def test_parameter_count_without_batch_norm():
    conv1 = 1 * 32 * 3 * 3 + 32  # the convolutions get their bias back
    conv2 = 32 * 64 * 3 * 3 + 64
    fc1 = 64 * 7 * 7 * 128 + 128
    fc2 = 128 * 10 + 10
    assert conv1 + conv2 + fc1 + fc2 == 421_642
    assert parameter_count(build_model(ModelConfig(batch_norm=False))) == 421_642


def test_every_conv_is_followed_by_batch_norm_relu_and_pooling():
    # The drift TorchServe's MNIST example suffered (a ReLU lost after conv2) would show here.
    layer_types = [[type(layer) for layer in block] for block in build_model().features]
    assert layer_types == [[nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]] * 2
    assert [type(layer) for layer in build_model().classifier] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout,
                                                                    nn.Linear]


def test_a_dict_config_builds_the_same_model_as_a_model_config():
    config = ModelConfig(conv1=8, conv2=16, hidden=32, batch_norm=False, dropout=0.0)
    torch.manual_seed(0)
    from_config = build_model(config)
    torch.manual_seed(0)
    from_dict = build_model(dataclasses.asdict(config))  # the form checkpoints and archives store
    assert from_dict.config == config
    assert repr(from_dict) == repr(from_config)
    assert from_dict.state_dict().keys() == from_config.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(from_dict.state_dict().values(), from_config.state_dict().values(),
                                                  strict=True))


def test_no_config_means_the_default_config():
    assert build_model().config == ModelConfig() == build_model({}).config
    assert isinstance(build_model(), Net)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dropout": 1.0}, r"^model.dropout must be in \[0, 1\), got 1.0$"),
        ({"dropout": -0.1}, r"^model.dropout must be in \[0, 1\), got -0.1$"),
        ({"conv1": 0}, "must be positive"),
        ({"hidden": -4}, "must be positive"),
    ],
)
def test_an_invalid_config_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        build_model(config)
    with pytest.raises(ValueError, match=message):
        Net(ModelConfig(**config))


def test_an_unknown_key_in_a_dict_config_is_refused():
    with pytest.raises(TypeError, match="bogus"):
        build_model({"bogus": 1})
