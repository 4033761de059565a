"""Request bodies parsed as JSON with a bound on their nesting: every JSON body the handler reads, its
own API's and the KServe v2 protocol's (serving/worker/oip.py), goes through `parse_json`.

Packed into the model archive beside handler.py (serving/archive.py), so it imports nothing the
archive does not carry, TorchServe included.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from training.core.inputs.preprocess import PreprocessError

# Far above any valid request (the deepest: a nested v2 UINT8 tensor, 7 levels), far below Python's recursion limit.
MAX_JSON_DEPTH = 32


def parse_json(raw: bytes) -> Any:
    """JSON bytes → the value, or PreprocessError for a body too deep or not JSON."""
    # json.loads recurses once per nesting level: `[` × 50,000 (50 KB, well under the size limit)
    # would raise RecursionError, a 500. So anything deeper than MAX_JSON_DEPTH is refused before parsing.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and nesting(raw) > MAX_JSON_DEPTH:
        raise PreprocessError(f"JSON nested too deeply: at most {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PreprocessError("malformed JSON body") from None


def nesting(raw: bytes) -> int:
    """Deepest bracket nesting outside JSON strings (counted on the bytes, with numpy: no recursion)."""
    codes = np.frombuffer(raw, np.uint8)
    quote = codes == ord('"')
    # A quote after an odd run of backslashes is escaped: run lengths from the last other byte's index.
    position = np.arange(len(codes))
    last_other = np.maximum.accumulate(np.where(codes != ord("\\"), position, -1))
    run = np.concatenate([[0], position[:-1] - last_other[:-1]])  # backslashes right before each byte
    escaped = run % 2 == 1
    in_string = np.cumsum(quote & ~escaped) % 2 == 1
    step = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    step[in_string] = 0
    return int(np.cumsum(step).max(initial=0))
