"""serving/worker/metric_buffer.py: counters summed, gauges last, emitted at most once per interval, and never later."""

from __future__ import annotations

import threading
import time

import pytest

from serving.worker.metric_buffer import MetricBuffer, interval_from_env

V1 = (("ModelVersion", "1.0"),)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.emitted = threading.Event()

    def __call__(self, kind, name, value, unit, dimensions) -> None:
        self.calls.append((kind, name, value, unit, dimensions))
        self.emitted.set()


def test_the_first_batch_is_emitted_at_once_and_the_next_ones_summed_by_the_timer():
    emit = Recorder()
    # 2 s: the held check below must run inside one interval even on a slow, busy machine.
    buffer = MetricBuffer(emit, interval=2.0)
    started = time.monotonic()
    buffer.count("MNISTPredictions", 2, (("Digit", "7"), *V1))
    buffer.gauge("MNISTPreprocessTime", 1.5)
    buffer.flush_if_due()
    assert sorted(emit.calls) == [("counter", "MNISTPredictions", 2, "count", (("Digit", "7"), *V1)),
                                  ("gauge", "MNISTPreprocessTime", 1.5, "ms", ())]
    emit.calls.clear()
    emit.emitted.clear()
    for value, preprocess in ((1, 2.0), (3, 4.0)):  # two more batches within the interval
        buffer.count("MNISTPredictions", value, (("Digit", "7"), *V1))
        buffer.count("MNISTPredictions", 1, (("Digit", "1"), *V1))
        buffer.count("mnist_not_a_digit_total", 0, V1)  # nothing to add: no line
        buffer.gauge("MNISTPreprocessTime", preprocess)
        buffer.flush_if_due()
    assert emit.calls == []  # held: the last emission is younger than the interval
    assert emit.emitted.wait(10)  # no third batch comes: the timer emits them, an interval after the first
    assert time.monotonic() - started >= 1.99
    deadline = time.monotonic() + 10
    while len(emit.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.4)  # and only once
    assert sorted(emit.calls) == [("counter", "MNISTPredictions", 2, "count", (("Digit", "1"), *V1)),
                                  ("counter", "MNISTPredictions", 4, "count", (("Digit", "7"), *V1)),
                                  ("gauge", "MNISTPreprocessTime", 4.0, "ms", ())]


def test_a_batch_after_the_interval_emits_what_is_pending_itself():
    now = [100.0]
    emit = Recorder()
    buffer = MetricBuffer(emit, interval=4.0, clock=lambda: now[0])
    buffer.count("MNISTRejectedRequests", 1)
    buffer.flush_if_due()
    now[0] += 2.0
    buffer.count("MNISTRejectedRequests", 2)
    buffer.flush_if_due()  # arms the timer (2 s of real time: the next line comes long before it fires)
    now[0] += 2.4
    buffer.count("MNISTRejectedRequests", 3)
    buffer.flush_if_due()  # due: emits 2 + 3 at once and cancels the timer
    assert [c[2] for c in emit.calls] == [1, 5]
    time.sleep(2.5)  # past the timer's deadline: it was cancelled
    assert [c[2] for c in emit.calls] == [1, 5]


def test_interval_zero_emits_every_batch():
    emit = Recorder()
    buffer = MetricBuffer(emit, interval=0)
    for _ in range(3):
        buffer.count("MNISTPredictions", 1, (("Digit", "3"),))
        buffer.flush_if_due()
    assert [c[2] for c in emit.calls] == [1, 1, 1]
    with pytest.raises(ValueError, match="interval"):
        MetricBuffer(emit, interval=-1)


@pytest.mark.parametrize("raw", ["1s", "-1", "nan", "inf", ""])
def test_a_bad_interval_in_the_environment_says_which_variable(raw):
    with pytest.raises(ValueError, match=r"^MNIST_METRICS_INTERVAL must be a number of seconds >= 0"):
        interval_from_env({"MNIST_METRICS_INTERVAL": raw})


def test_the_interval_defaults_to_a_second():
    assert interval_from_env({}) == 1.0
    assert interval_from_env({"MNIST_METRICS_INTERVAL": "0"}) == 0.0
    assert interval_from_env({"MNIST_METRICS_INTERVAL": "2.5"}) == 2.5
