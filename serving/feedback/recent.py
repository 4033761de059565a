"""The page backend's memory of its recent answers, so a correction names one by id.

The page never sends the 28×28 back (it could send any): the backend kept what the model saw, which
version answered and what it said, and the correction adds only the label and the raw-image opt-in.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.feedback.service import FeedbackInputError, parse_label
from training.feedback.store import Correction

# Answers a person may still correct: the page corrects the last one it shows, so a few hundred cover
# many tabs, and a bounded memory cannot be grown by a client that only predicts.
REMEMBERED = 256


@dataclass(frozen=True)
class Remembered:
    seen: bytes  # the 28×28 uint8 the model saw
    raw: bytes  # the image the page sent; stored only where the user opts in
    model_name: str
    model_version: str
    answer: int
    confidence: float
    is_digit: bool


class RecentAnswers:
    def __init__(self, size: int = REMEMBERED) -> None:
        self.size = size
        self._answers: OrderedDict[str, Remembered] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, seen: np.ndarray, raw: bytes, model_name: str, version: str, answer: dict[str, Any]) -> str:
        entry = Remembered(seen.astype(np.uint8).tobytes(), raw, model_name, version, int(answer["digit"]),
                           float(answer.get("confidence", 0.0)), bool(answer.get("is_digit", True)))
        key = secrets.token_urlsafe(12)  # unguessable: an id names one answer, not a counter to walk
        with self._lock:
            self._answers[key] = entry
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)
        return key

    def get(self, key: str) -> Remembered | None:
        with self._lock:
            return self._answers.get(key)


def correction_from_page(body: dict[str, Any], recent: RecentAnswers) -> Correction:
    """{"id": an answer's id, "label": 0-9 or "not a digit", "keep_raw": true to keep the drawn image}."""
    key = body.get("id")
    entry = recent.get(key) if isinstance(key, str) else None
    if entry is None:
        raise FeedbackInputError("id names no recent answer of this page: predict again, then correct it")
    return Correction(image=entry.seen, model_name=entry.model_name, model_version=entry.model_version,
                      answer=entry.answer, confidence=entry.confidence, is_digit=entry.is_digit,
                      label=parse_label(body.get("label")), source="page",
                      raw_image=entry.raw if body.get("keep_raw") is True else None)
