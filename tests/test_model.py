"""training.core.model: the CNN's shape, size and layer order, built the same way from a config or its dict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from training.core.model import ModelConfig, Net, build_model, fuse_batch_norm

ROOT = Path(__file__).resolve().parent.parent


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n", [1, 7])
def test_logits_have_shape_n_by_10(n):
    model = build_model().eval()
    with torch.no_grad():
        logits = model(torch.zeros(n, 1, 28, 28))
    assert logits.shape == (n, 10) and logits.dtype == torch.float32


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from the architecture the docstring states and the config's sizes."""
    shapes: dict[str, tuple[int, ...]] = {}
    per_conv = 3 if config.batch_norm else 2  # conv, (batch norm,) ReLU
    for block, (c_in, c_out) in enumerate([(1, config.conv1), (config.conv1, config.conv2)]):
        for k in range(config.convs):
            conv = f"features.{block}.{k * per_conv}"
            shapes[f"{conv}.weight"] = (c_out, c_in if k == 0 else c_out, 3, 3)
            if config.batch_norm:  # batch norm's shift replaces the conv's bias (after the pool: one further)
                bn = f"features.{block}.{k * per_conv + 1 + (config.pool_first and k == config.convs - 1)}"
                shapes[f"{bn}.weight"] = shapes[f"{bn}.bias"] = (c_out,)
            else:
                shapes[f"{conv}.bias"] = (c_out,)
    shapes["classifier.1.weight"] = (config.hidden, config.conv2 * 7 * 7)  # two 2× poolings: 28 → 7
    shapes["classifier.1.bias"] = (config.hidden,)
    shapes["classifier.4.weight"] = (config.num_classes, config.hidden)
    shapes["classifier.4.bias"] = (config.num_classes,)
    return shapes


@pytest.mark.parametrize("config", [
    ModelConfig(), ModelConfig(batch_norm=False), ModelConfig(conv1=8, conv2=16, hidden=32, num_classes=5),
    ModelConfig(convs=2), ModelConfig(convs=3, batch_norm=False), ModelConfig(pool_first=True),
    ModelConfig(convs=2, pool_first=True),
], ids=["default", "no-batch-norm", "small", "two-convs", "three-convs-no-batch-norm", "pool-first",
        "two-convs-pool-first"])
def test_every_parameter_has_the_shape_the_architecture_states(config):
    model = build_model(config)
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == expected_shapes(config)


def test_the_readme_states_the_default_models_parameter_count():
    count = parameter_count(build_model())
    assert count == 421_738
    assert f"; {count:,} parameters." in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("config", "size"), [("ensemble-deep.yaml", (870_826, 4.5)),
                                              ("ensemble-deep3.yaml", (917_098, 7.9))])
def test_the_readme_states_the_deeper_members_size(config, size):
    from training.config import load_yaml
    from training.recipes.distill import multiply_accumulates

    deep = ModelConfig(**load_yaml(ROOT / "configs" / config)["model"])
    count = parameter_count(build_model(deep))
    ratio = multiply_accumulates(deep) / multiply_accumulates(ModelConfig())
    assert (count, round(ratio, 1)) == size
    assert f"{ratio:.1f}× the multiply-accumulates, {count:,} parameters" in (ROOT / "README.md").read_text()


def test_every_conv_is_followed_by_batch_norm_relu_and_pooling():
    # The drift TorchServe's MNIST example suffered (a ReLU lost after conv2) would show here. A block's
    # last ReLU runs after its pool (the same function: test_relu_after_the_pool_is_relu_before_it).
    layer_types = [[type(layer) for layer in block] for block in build_model().features]
    assert layer_types == [[nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]] * 2
    assert [type(layer) for layer in build_model().classifier] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout,
                                                                    nn.Linear]
    deeper = [[type(layer) for layer in block] for block in build_model(ModelConfig(convs=2)).features]
    assert deeper == [[nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]] * 2
    pool_first = [[type(layer) for layer in block] for block in build_model(ModelConfig(pool_first=True)).features]
    assert pool_first == [[nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]] * 2


def relu_before_pool(block: nn.Sequential) -> nn.Sequential:
    """The block in the textbook order (… → ReLU → pool), sharing its layers."""
    *body, pool, relu = block
    assert isinstance(pool, nn.MaxPool2d) and isinstance(relu, nn.ReLU)
    return nn.Sequential(*body, nn.ReLU(), pool)


@pytest.mark.parametrize("config", [ModelConfig(conv1=8, conv2=16, hidden=32), ModelConfig(convs=2, conv1=8, conv2=16),
                                    ModelConfig(batch_norm=False, conv1=8, conv2=16)],
                         ids=["default", "two-convs", "no-batch-norm"])
def test_relu_after_the_pool_is_relu_before_it(config):
    """Max-pool and ReLU commute: the cheaper order computes the same outputs and the same gradients, bit
    for bit, in training mode (batch statistics) and in eval, so checkpoints of either order are one model."""
    torch.manual_seed(0)
    model = build_model(config)
    textbook = nn.Sequential(*(relu_before_pool(block) for block in model.features))
    # A checkpoint written in either order loads into the other: the parameters sit at the same indices.
    assert {k: v.shape for k, v in textbook.state_dict().items()} == {
        k: v.shape for k, v in model.features.state_dict().items()}
    x = torch.randn(16, 1, 28, 28)
    for train in (True, False):
        model.train(train)
        grads = []
        for features in (model.features, textbook):
            model.zero_grad(set_to_none=True)
            out = model.classifier[1:2](features(x).flatten(1))  # dropout off: the same draw is not the point
            out.square().sum().backward()
            grads.append([p.grad.clone() for p in model.features.parameters()])
            if features is model.features:
                first = out.detach()
        assert torch.equal(first, out.detach())
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize(("convs", "pool_first"), [(1, False), (2, False), (1, True), (2, True)])
def test_folding_batch_norm_keeps_the_function_and_leaves_no_batch_norm(convs, pool_first):
    torch.manual_seed(0)
    model = build_model(ModelConfig(conv1=8, conv2=16, hidden=32, convs=convs, pool_first=pool_first)).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics far from identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_batch_norm(model)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2 * convs


def test_a_batch_norm_after_the_pool_with_a_negative_scale_stays():
    """max(a·x) = a·min(x) for a < 0: folding such a batch norm into the conv before the pool would change the
    answers, so it stays, and the fused model still computes what the model does."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(conv1=8, conv2=16, hidden=32, pool_first=True)).eval()
    second = model.features[1][2]
    with torch.no_grad():
        second.weight[3] = -0.5  # one channel of the second block's batch norm
        x = torch.randn(4, 1, 28, 28)
        expected = model(x)
        fused = fuse_batch_norm(model)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
    assert isinstance(model.features[0][2], nn.Identity) and model.features[1][2] is second


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
        ({"convs": 0}, "must be positive"),
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
