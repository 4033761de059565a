"""Calibration, the "not a digit" score and the explainer on known inputs (no training, no server)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from training.calibration import calibrated_softmax, expected_calibration_error, fit_temperature, reliability_bins
from training.core.explain import integrated_gradients
from training.core.model import ModelConfig, Net
from training.core.ood import auroc, features_and_logits, fit_detector, is_digit, ood_score, set_threshold
from training.core.tensors import normalize
from training.data import DataError
from training.tools.explain import delete_top, saliency
from training.tools.ood_data import FASHION_DEFAULT_DIR, load_fashion, synthetic_sets

# --- calibration --------------------------------------------------------------------------------


def test_ece_of_known_bins():
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    # Bin (13/15, 14/15]: confidence 0.9, accuracy 0.5; bin (8/15, 9/15]: confidence 0.6, accuracy 1.
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4, abs=1e-12)
    conf, acc, count = reliability_bins(probabilities, labels)
    assert count[13] == 2 and count[8] == 2 and sum(count) == 4
    assert (conf[13], acc[13], conf[8], acc[8]) == pytest.approx((0.9, 0.5, 0.6, 1.0))


def test_ece_is_zero_when_confidence_equals_accuracy():
    one_hot = torch.eye(10, dtype=torch.float64)  # confidence 1.0 (the last bin), always right
    assert expected_calibration_error(one_hot, torch.arange(10)) == 0.0
    assert expected_calibration_error(one_hot, (torch.arange(10) + 1) % 10) == 1.0  # always wrong


def test_temperature_fit_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50_000, 10, generator=generator) * 4
    true_temperature = 2.5  # labels drawn from softmax(logits / 2.5): the calibrated model is logits / 2.5
    labels = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=generator).squeeze(1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    before = expected_calibration_error(torch.softmax(logits, 1), labels)
    after = expected_calibration_error(calibrated_softmax(logits, fitted), labels)
    assert after < 0.01 < before


def test_temperature_is_one_for_an_already_calibrated_model():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(50_000, 10, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.03)


# --- the "not a digit" score ----------------------------------------------------------------------


def test_auroc_on_known_scores():
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0])) == 4.5 / 6  # one tie counts half
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])) == 0.0


def test_scores_rank_confident_and_central_inputs_above_the_rest():
    confident, flat = torch.tensor([[8.0, 0, 0]]), torch.tensor([[1.0, 1, 1]])
    for method in ("msp", "energy"):
        detector = {"method": method, "temperature": 1.0}
        assert ood_score(detector, None, confident) > ood_score(detector, None, flat)
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])
    labels = torch.arange(2).repeat(2000)
    features = means[labels] + torch.randn(4000, 4, generator=generator)
    detector = fit_detector("mahalanobis_all", features, labels)
    probes = torch.tensor([[10.0, 0, 0, 0], [10.0, 1.5, 0, 0], [10.0, 0, 6, 0], [-20.0, -20, 0, 0]])
    scores = ood_score(detector, probes, torch.zeros(4, 2))
    assert scores.argsort(descending=True).tolist() == [0, 1, 2, 3]  # further from every class mean: lower
    assert scores[0] == pytest.approx(0.0, abs=0.05)  # at a class mean, with unit covariance: distance 0


def test_threshold_rejects_the_chosen_fraction_of_validation_digits():
    val_scores = torch.arange(1000, dtype=torch.float32)
    detector = set_threshold({"method": "msp"}, val_scores, false_rejection=0.01)
    assert int((~is_digit(detector, val_scores)).sum()) == 10


def test_detector_features_are_block_means_then_the_last_layer_input():
    torch.manual_seed(0)
    model = Net(ModelConfig(conv1=4, conv2=8, hidden=16)).eval()
    x = torch.randn(3, 1, 28, 28)
    features, logits = features_and_logits(model, x)
    assert features.shape == (3, 4 + 8 + 16)
    assert torch.equal(logits, model(x))
    assert torch.equal(features[:, :4], model.features[0](x).mean((2, 3)))
    assert torch.equal(model.classifier[-1](features[:, -16:]), logits)
    # "mahalanobis" reads only the last-layer input: the block means do not move its score.
    detector = fit_detector("mahalanobis", torch.randn(100, 28), torch.arange(10).repeat(10), width=16)
    shifted = features.clone()
    shifted[:, :12] += 100
    assert torch.equal(ood_score(detector, features, logits), ood_score(detector, shifted, logits))


def test_fashion_mnist_is_verified(tmp_path):
    if not FASHION_DEFAULT_DIR.is_dir():
        pytest.skip("Fashion-MNIST absent: install the Debian package dataset-fashion-mnist (make system-deps)")
    images, labels = load_fashion(train=False)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(FASHION_DEFAULT_DIR / f"{name}.gz", tmp_path / f"{name}.gz")
    raw = bytearray(gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[5000] ^= 1
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    with pytest.raises(DataError, match="does not match its SHA-256"):
        load_fashion(train=False, folder=tmp_path)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion(train=True, folder=tmp_path)


def test_synthetic_sets_are_28x28_and_reproducible():
    first, again = synthetic_sets(5, seed=3), synthetic_sets(5, seed=3)
    for name, images in first.items():
        assert images.shape == (5, 28, 28) and images.dtype == np.uint8, name
        assert np.array_equal(images, again[name]) and images.max() > 0, name


# --- explanations ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> Net:
    torch.manual_seed(0)
    return Net(ModelConfig(conv1=4, conv2=8, hidden=16, dropout=0.0)).eval()


def test_integrated_gradients_shape_zero_background_and_completeness(tiny_model):
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    images[:, 8:20, 12:16] = 255  # a bar: the only ink
    images[1, 4:8, 4:8] = 128
    x = normalize(images)
    target = torch.tensor([0, 3, 9])
    maps = integrated_gradients(tiny_model, x, target, steps=64)
    assert maps.shape == (3, 28, 28)
    # Attribution = (input − black baseline) × mean gradient: exactly zero where there is no ink.
    assert torch.count_nonzero(maps[images == 0]) == 0
    with torch.no_grad():
        gap = tiny_model(x).gather(1, target[:, None]) - tiny_model(normalize(torch.zeros_like(images))).gather(
            1, target[:, None])
    assert maps.sum((1, 2)) == pytest.approx(gap.squeeze(1).tolist(), abs=1e-2)  # completeness, to the Riemann error


def test_saliency_has_the_shape_of_the_image(tiny_model):
    x = normalize(torch.zeros(2, 28, 28, dtype=torch.uint8))
    maps = saliency(tiny_model, x, torch.tensor([1, 2]))
    assert maps.shape == (2, 28, 28) and bool((maps >= 0).all())


def test_delete_top_blacks_out_exactly_the_first_k_pixels():
    images = torch.full((2, 28, 28), 200, dtype=torch.uint8)
    order = torch.arange(784).repeat(2, 1)
    order[1] = order[1].flip(0)
    out = delete_top(images, order, 3)
    assert out[0].flatten()[:3].tolist() == [0, 0, 0] and int((out[0] == 0).sum()) == 3
    assert out[1].flatten()[-3:].tolist() == [0, 0, 0] and int((out[1] == 0).sum()) == 3
    assert int(images.min()) == 200  # the input is untouched
