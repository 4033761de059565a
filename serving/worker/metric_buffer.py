"""Counters and gauges of the handler, emitted at most once per interval instead of once per batch.

Each backend metric is a log line on the worker's stdout that the Java frontend reads, parses and
adds to its Prometheus registry. Per batch the handler had ~14 of them (one `MNISTPredictions` line
per digit in the batch): under load that was ~9% of the workers' time, and as much again for the
frontend. Counters add up and a gauge only keeps its last value, so holding them for a second and
emitting the sums loses nothing a scrape (every 15 s or so) could see. Histogram observations are
not buffered: each one is a sample.

The first batch after a quiet interval is emitted at once; within the interval the batch's values
wait, and a timer emits them when it ends, so nothing waits longer than `interval` even if no
other batch comes. A worker that dies loses at most that interval's counts.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

# (kind "counter" | "gauge", metric name, unit, dimensions as ((name, value), ...)) → value
Key = tuple[str, str, str, tuple[tuple[str, str], ...]]
Emit = Callable[[str, str, Any, str, tuple[tuple[str, str], ...]], None]


def interval_from_env(environ: Mapping[str, str] = os.environ, default: float = 1.0) -> float:
    """MNIST_METRICS_INTERVAL in seconds (0: every batch); a bad value stops the worker with this message."""
    raw = environ.get("MNIST_METRICS_INTERVAL")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"MNIST_METRICS_INTERVAL must be a number of seconds >= 0 (0: every batch), got {raw!r}")
    return value


class MetricBuffer:
    """Sums counters and keeps each gauge's last value; `flush_if_due` emits them through `emit`.

    `emit(kind, name, value, unit, dimensions)` is called once per metric and dimension set.
    interval 0 emits on every `flush_if_due` (the behaviour without a buffer).
    """

    def __init__(self, emit: Emit, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self._emit = emit
        self.interval = interval
        self._clock = clock
        self._pending: dict[Key, Any] = {}
        self._lock = threading.Lock()
        self._last_flush = float("-inf")
        self._timer: threading.Timer | None = None

    def count(self, name: str, value: int, dimensions: tuple[tuple[str, str], ...] = (), unit: str = "count") -> None:
        if value:
            key = ("counter", name, unit, dimensions)
            with self._lock:
                self._pending[key] = self._pending.get(key, 0) + value

    def gauge(self, name: str, value: float, dimensions: tuple[tuple[str, str], ...] = (), unit: str = "ms") -> None:
        with self._lock:
            self._pending[("gauge", name, unit, dimensions)] = value

    def flush_if_due(self) -> None:
        """Emit now if the last emission is `interval` old, else make sure a timer will."""
        with self._lock:
            wait = self._last_flush + self.interval - self._clock()
            if wait > 0:
                if self._timer is None and self._pending:
                    timer = threading.Timer(wait, self.flush)
                    timer.daemon = True  # a worker that exits does not wait for its metrics
                    timer.start()
                    self._timer = timer
                return
        self.flush()

    def flush(self) -> None:
        """Emit everything pending (from the handler's thread or the timer's)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = self._clock()
            if self._timer is not None:
                self._timer.cancel()  # no-op when this is the timer itself
                self._timer = None
        for (kind, name, unit, dimensions), value in pending.items():
            self._emit(kind, name, value, unit, dimensions)
