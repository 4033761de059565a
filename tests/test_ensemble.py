"""Ensembles: the batched forwards (grouped convs, vmap) give exactly the average of the members'
calibrated probabilities, also for members of different architectures; an ensemble checkpoint packs
into one .mar whose handler answers in the single model's response format with those averaged
probabilities.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from serving.archive import build_archive
from serving.worker import variants
from training.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from training.core.ensemble import METHODS, EnsembleError, GroupedEnsemble, build_ensemble
from training.core.model import ModelConfig, Net
from training.core.tensors import normalize
from training.recipes import ensemble_train
from training.recipes.ensemble_train import combine, load_ensemble_checkpoint

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import SAMPLE_7, TINY_MODEL, save_tiny_checkpoint, unpack  # noqa: E402
from test_handler import InProcessWorker, raw  # noqa: E402

SMALL = ModelConfig(conv1=4, conv2=8, hidden=16)
TEMPERATURES = [1.0, 2.0, 0.5]


def members(n: int = 3, config: ModelConfig = SMALL) -> list[Net]:
    """Untrained members with batch-norm statistics far from the identity, so folding them matters."""
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = Net(config)
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        nets.append(net.eval())
    return nets


def one_by_one(nets: list[Net], x: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([torch.softmax(m(x) / t, 1) for m, t in zip(nets, temperatures, strict=True)]).mean(0)


@pytest.mark.parametrize(("convs", "pool_first"), [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("method", METHODS)
def test_each_batched_forward_averages_the_members_calibrated_probabilities(method, convs, pool_first):
    nets = members(config=dataclasses.replace(SMALL, convs=convs, pool_first=pool_first))
    x = normalize(torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        out = build_ensemble(nets, TEMPERATURES, method)(x)
    expected = one_by_one(nets, x, TEMPERATURES)
    # A softmax of the output gives back the average: callers treat it like a single model's logits.
    torch.testing.assert_close(torch.softmax(out, 1), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exp(), expected, rtol=0, atol=1e-6)


# Three architectures, interleaved: one conv per block, two, and a wider hidden layer.
MIXED = [SMALL, dataclasses.replace(SMALL, convs=2), SMALL, dataclasses.replace(SMALL, hidden=24),
         dataclasses.replace(SMALL, convs=2)]


@pytest.mark.parametrize("method", METHODS)
def test_members_of_different_architectures_average_like_one_by_one(method):
    nets = [members(1, config)[0] for config in MIXED]
    for seed, net in enumerate(nets):  # members(1, …) seeds every one with 0: make them differ
        torch.manual_seed(seed)
        net.classifier[-1].bias.data.normal_()
    temperatures = [1.0, 2.0, 0.5, 1.5, 0.7]
    x = normalize(torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        out = build_ensemble(nets, temperatures, method)(x)
    torch.testing.assert_close(out.exp(), one_by_one(nets, x, temperatures), rtol=0, atol=1e-6)


def test_a_grouped_forward_needs_one_architecture_and_temperatures_must_be_positive():
    with pytest.raises(EnsembleError, match="architecture"):
        GroupedEnsemble([Net(SMALL), Net(ModelConfig(conv1=8, conv2=8, hidden=16))])
    with pytest.raises(EnsembleError, match="positive temperature"):
        build_ensemble(members(2), [1.0, 0.0])
    with pytest.raises(EnsembleError, match="at least one"):
        build_ensemble([])


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_norm_that_cannot_fold_after_the_pool_is_applied_there(method):
    """A pool-first member whose batch norm scales a channel by a negative factor: max(-x) = -min(x), so it
    cannot fold into the conv (fuse_batch_norm keeps it). The grouped forward applies it after the pool
    as a per-channel scale and shift (the other members' channels: the identity), and averages the same."""
    nets = members(3, dataclasses.replace(SMALL, pool_first=True))
    with torch.no_grad():
        nets[1].features[1][2].weight[:3] = torch.tensor([-1.0, -0.5, -2.0])
        nets[2].features[0][2].weight[0] = -0.7
    x = normalize(torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    ensemble = build_ensemble(nets, TEMPERATURES, method)
    with torch.inference_mode():
        out = ensemble(x)
    torch.testing.assert_close(out.exp(), one_by_one(nets, x, TEMPERATURES), rtol=0, atol=1e-6)
    if method == "grouped":
        assert ensemble.after_pool == [True, True]
        scale = ensemble.scale1.flatten()
        assert (scale[:8] == 1).all() and (scale[8:11] < 0).all() and (scale[16:] == 1).all()


@pytest.mark.slow
@pytest.mark.parametrize(("mixed", "variant"), [(False, "fused"), (True, "fused"), (True, "bf16")],
                         ids=["one-architecture", "mixed-architectures", "mixed-architectures-bf16"])
def test_an_ensemble_archive_serves_the_average_in_the_single_model_format(tmp_path, mnist_dir, monkeypatch,
                                                                          mixed, variant):
    # bf16 wraps the whole ensemble (the grouped forward batches plain networks, not bf16 wrappers).
    # Forced on, so that the bf16 path runs on any CPU, also where it would fall back to fused.
    monkeypatch.setattr(variants.precision, "use_cpu_bf16", lambda train=True, config=None: True)
    configs = [TINY_MODEL, dataclasses.replace(TINY_MODEL, convs=2), TINY_MODEL] if mixed else [TINY_MODEL] * 3
    paths = [save_tiny_checkpoint(tmp_path / f"m{k}.pt", seed=k, model=c) for k, c in enumerate(configs)]
    for path, temperature in zip(paths, TEMPERATURES, strict=True):  # as issue 13's calibration stores it
        atomic_save({**load_checkpoint(path), "temperature": temperature}, path)
    ensemble = combine(paths, str(mnist_dir))
    assert ensemble["temperatures"] == TEMPERATURES and len(ensemble["members"]) == 3
    assert len(ensemble["metrics"]["test_wrong_in_k_members"]) == 3  # k = 1, 2, 3
    assert [m.config for m in ensemble_train.ensemble_members(ensemble)] == configs  # what distill and bench load
    atomic_save(ensemble, tmp_path / "ensemble.pt")
    assert load_ensemble_checkpoint(tmp_path / "ensemble.pt")["metrics"]["members"] == 3

    archive = build_archive(tmp_path / "ensemble.pt", tmp_path / "store", "mnist", "1.0", variant, ensemble=True)
    model_dir = unpack(archive.path, tmp_path / "unpacked")
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["ensemble"]["members"] == 3 and meta["ensemble"]["temperatures"] == TEMPERATURES
    assert [ModelConfig(**c) for c in meta["ensemble"]["model_configs"]] == configs
    worker = InProcessWorker(model_dir)
    assert isinstance(worker.handler.model, variants.precision.BF16Model) == (variant == "bf16")
    [(status, body), (explained, answer)] = worker.handle([raw(SAMPLE_7.read_bytes())] * 2, explain=frozenset({1}))
    assert status == 200 and set(body) == {"digit", "confidence", "probabilities", "is_digit"}
    assert explained == 200  # explanations run on the fp32 ensemble (Integrated Gradients)
    assert torch.tensor(answer["explanation"]["attributions"]).shape == (28, 28)

    from training.core.inputs.preprocess import preprocess_bytes

    nets = [model_from_checkpoint(load_checkpoint(p)) for p in paths]
    expected = one_by_one(nets, normalize(preprocess_bytes(SAMPLE_7.read_bytes())), TEMPERATURES)[0]
    served = torch.tensor([body["probabilities"][str(d)] for d in range(10)])
    if variant == "bf16":  # 8 bits of mantissa
        torch.testing.assert_close(served, expected, rtol=0, atol=0.02)
    else:
        torch.testing.assert_close(served, expected, rtol=0, atol=2e-6)  # the response rounds to 6 decimals
        assert body["digit"] == expected.argmax().item()


def test_an_ensemble_archive_needs_an_ensemble_checkpoint(tmp_path):
    single = save_tiny_checkpoint(tmp_path / "model.pt")
    from training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not an ensemble"):
        build_archive(single, tmp_path / "store", "mnist", "1.0", ensemble=True)
    assert not (tmp_path / "store").exists()


def test_members_train_concurrently_and_are_reused_afterwards(tmp_path, mnist_dir, monkeypatch, capsys):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    config = tmp_path / "member.yaml"
    config.write_text("epochs: 1\ntrain_limit: 2000\nval_size: 500\ntensorboard: false\nbatch_size: 64\nthreads: 1\n")
    args = ["--members", "2", "--jobs", "2", "--config", str(config), "--out-dir", str(tmp_path / "ens"), "--dry-run"]
    assert ensemble_train.main(args) == 0
    first = capsys.readouterr().out
    assert "member 0: done" in first and "member 1: done" in first
    seeds = [load_checkpoint(tmp_path / "ens" / f"member-{k}" / "model.pt")["train_config"]["seed"] for k in (0, 1)]
    assert seeds == [0, 1]
    assert ensemble_train.main(args) == 0  # the same config again: nothing retrains
    assert capsys.readouterr().out.count("reusing") == 2


def test_wrong_in_counts_digits_by_how_many_members_get_them_wrong():
    labels = torch.tensor([0, 1, 2, 3, 4])
    predictions = torch.tensor([[0, 9, 9, 9, 4],   # member 0: wrong on 1, 2, 3
                                [0, 1, 9, 9, 4],   # member 1: wrong on 2, 3
                                [0, 1, 2, 9, 5]])  # member 2: wrong on 3, 4
    # digit 1 and 4: one member wrong; digit 2: two; digit 3: all three; digit 0: none (not counted)
    assert ensemble_train.wrong_in(predictions, labels) == [2, 1, 1]
