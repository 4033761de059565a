"""One place that turns a correction request into a stored row or a clear 4xx, for both front doors.

The page backend (serving/page.py) knows what the model saw: it remembers its recent answers and the
page names one by id. A program (serving/feedback/api.py) sends the image it sent TorchServe and the
answer it got; the 28×28 is made here by the handler's own preprocessing. Either way nothing is stored
unless every field is valid, the key is under its rate and the body under its limit.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from training.core.inputs.preprocess import PreprocessError, preprocess_bytes
from training.feedback.models import NOT_A_DIGIT
from training.feedback.store import Correction, FeedbackStore

# A program's body carries one image as base64 (TorchServe's own 1 MiB request limit, ×4/3) and a few
# fields; a page correction names an answer by id and is tiny.
MAX_API_BODY = 1_400_000
MAX_PAGE_BODY = 1024
# Per key: a burst of RATE_BURST corrections, then one every 60 / RATE_PER_MINUTE seconds. A person
# correcting by hand stays far below it; a loop posting the same picture is stopped within seconds.
RATE_PER_MINUTE = 30
RATE_BURST = 10
LABELS = "0-9, or \"not a digit\""

Answer = tuple[int, dict[str, Any]]


class FeedbackInputError(ValueError):
    """A correction that cannot be stored as sent: the message says which field and why."""


class RateLimiter:
    """A token bucket per key, in this process (each front door counts its own keys)."""

    def __init__(self, per_minute: float = RATE_PER_MINUTE, burst: int = RATE_BURST) -> None:
        self.rate, self.burst = per_minute / 60.0, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, monotonic time)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1, now)
            return True


def parse_label(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower().replace("_", " ") == "not a digit":
        return NOT_A_DIGIT
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
        return value
    if isinstance(value, str) and value in tuple("0123456789"):
        return int(value)
    raise FeedbackInputError(f"label must be {LABELS}, got {str(value)[:40]!r}")


def _field(body: dict[str, Any], name: str, kind: type, limit: int = 64) -> Any:
    value = body.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FeedbackInputError(f"{name} must be a {kind.__name__}, got {str(value)[:40]!r}")
    if isinstance(value, str) and not 0 < len(value) <= limit:
        raise FeedbackInputError(f"{name} must be 1-{limit} characters")
    return value


def correction_from_api(body: dict[str, Any], source: str) -> Correction:
    """A program's correction: {"image": base64 of the bytes sent to TorchServe, "model_name",
    "model_version", "answer", "confidence", "is_digit", "label", "keep_raw"?}."""
    try:
        raw = base64.b64decode(_field(body, "image", str, MAX_API_BODY), validate=True)
    except binascii.Error:
        raise FeedbackInputError("image must be base64 of the image sent to TorchServe") from None
    try:
        seen = preprocess_bytes(raw)
    except PreprocessError as err:
        raise FeedbackInputError(f"image: {err}") from None
    answer, confidence = _field(body, "answer", int), _field(body, "confidence", float)
    if not 0 <= answer <= 9 or not 0.0 <= confidence <= 1.0:
        raise FeedbackInputError("answer must be 0-9 and confidence 0-1")
    keep_raw = body.get("keep_raw", False) is True
    return Correction(image=seen.tobytes(), model_name=_field(body, "model_name", str),
                      model_version=_field(body, "model_version", str), answer=answer, confidence=confidence,
                      is_digit=_field(body, "is_digit", bool), label=parse_label(body.get("label")),
                      source=source, raw_image=raw if keep_raw else None)


class FeedbackService:
    """Validate, rate-limit, store; every refusal is a 4xx with {"error", "kind"} and stores nothing."""

    def __init__(self, store: FeedbackStore, limiter: RateLimiter | None = None) -> None:
        self.store = store
        self.limiter = limiter or RateLimiter()

    def submit(self, key: str, make: Callable[[], Correction]) -> Answer:
        """`make()` builds the Correction (raising FeedbackInputError); `key` is whose rate it counts in."""
        try:
            correction = make()
        except FeedbackInputError as err:
            return 400, {"error": str(err), "kind": "input"}
        if not self.limiter.allow(key):
            return 429, {"error": f"too many corrections from {key}: at most {RATE_BURST} at once, then "
                                  f"{RATE_PER_MINUTE} a minute", "kind": "rate"}
        try:
            row, new = self.store.add(correction)
        except SQLAlchemyError as err:  # a shared database that went away: the client may send it again
            return 503, {"error": f"the feedback database is not answering ({type(err).__name__})", "kind": "down"}
        return (201 if new else 200), {"id": row, "stored": new, "duplicate": not new}
