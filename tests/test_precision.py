"""training/core/precision.py: when bf16 autocast is used, and that DDP ranks agree on it (no timing asserted)."""

from __future__ import annotations

import pytest
import torch

from training.core import precision
from training.core.model import ModelConfig


@pytest.fixture(autouse=True)
def _fresh_decision():
    yield
    precision._decided = precision._speedup = precision._config = None


def test_descriptions_of_the_fixed_cases():
    assert precision.describe(torch.device("cpu"), False) == "fp32 (amp off)"
    assert precision.describe(torch.device("cuda", 0), True) == "bf16 autocast"
    assert precision.describe(torch.device("mps"), True) == "fp32"


def test_amp_off_or_a_slow_bf16_leaves_cpu_autocast_disabled(monkeypatch):
    with precision.autocast(torch.device("cpu"), False):
        assert torch.is_autocast_enabled("cpu") is False
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda train=True, *a: 0.9)
    assert precision.use_cpu_bf16() is False
    with precision.autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu") is False
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda train=True, *a: 2.0)
    with precision.autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu") is True


def test_ranks_take_the_minimum_of_their_decisions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda train=True, *a: 2.0)

    def another_rank_is_slower(speedup, op):
        assert op == torch.distributed.ReduceOp.MIN
        speedup.fill_(0.9)

    assert precision.decide_cpu_bf16(agree=another_rank_is_slower) is False
    assert precision.use_cpu_bf16() is False  # the agreed answer sticks for the rest of the run
    monkeypatch.setattr(precision, "mkldnn_bf16_supported", lambda: True)
    # Every rank reports the timing it decided on, not its own faster one.
    assert precision.describe(torch.device("cpu"), True) == "fp32 (bf16 only 0.90x fp32)"
    assert precision.decide_cpu_bf16() is True


def test_speedup_is_zero_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "mkldnn_bf16_supported", lambda: False)
    precision.cpu_bf16_speedup.cache_clear()
    try:
        assert precision.cpu_bf16_speedup(True) == 0.0
        assert precision.describe(torch.device("cpu"), True) == "fp32 (no native bf16 on this CPU)"
    finally:
        precision.cpu_bf16_speedup.cache_clear()


def test_a_kept_decision_is_used_without_timing(monkeypatch):
    def no_timing(*a, **k):
        raise AssertionError("a resumed run must not time bf16 again")

    monkeypatch.setattr(precision, "cpu_bf16_speedup", no_timing)
    trained = ModelConfig(pool_first=True)
    assert precision.decide_cpu_bf16(keep=True, config=trained) is True
    assert precision.use_cpu_bf16() is True
    assert precision.decide_cpu_bf16(keep=False) is False
    # The log line of a resumed run times the network it trains (once, for the line only).
    monkeypatch.setattr(precision, "mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda train=True, config=None: 1.2 if config == trained else 9.)
    assert precision.decide_cpu_bf16(keep=True, config=trained) is True
    assert precision.describe(torch.device("cpu"), True) == "bf16 autocast (1.20x fp32)"


def test_the_decision_times_the_network_trained_and_the_log_line_reports_that_timing(monkeypatch):
    """The default config trains a pool-first network; ModelConfig()'s default is another one. The
    timing behind the decision is the trained network's, and describe() reports it without timing again."""
    timed = []

    def speedup(train=True, config=None):
        timed.append(config)
        return 1.5

    monkeypatch.setattr(precision, "cpu_bf16_speedup", speedup)
    monkeypatch.setattr(precision, "mkldnn_bf16_supported", lambda: True)
    trained = ModelConfig(pool_first=True)
    assert precision.decide_cpu_bf16(config=trained) is True
    assert precision.describe(torch.device("cpu"), True) == "bf16 autocast (1.50x fp32)"
    assert timed == [trained]
