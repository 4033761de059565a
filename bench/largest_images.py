"""The worst accepted requests in `make bench-serve`: the largest image of each format, alone and mixed in.

Largest accepted: a real test digit scaled up to the decoder's pixel limit (training/core/inputs/decode.py,
MAX_PIXELS) or smaller where the encoded file would pass the frontend's body limit (max_request_size in
configs/config.properties): BMP is uncompressed, so the body limit caps it first. Rows:

  each format alone, one connection: what one such request costs end to end
  a mixed load at 64 connections, 1 request in 10 such an image, and the same load without them:
  beside wrk's figures for the whole mix, the p99 of ordinary digits sent by a probe of a few Python
  clients during each load, so the cost to everyone else shows apart from the large requests' own time
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from bench.load import Load, p99_ms, run_wrk, write_wrk_script
from bench.worst_cases import MAX_REQUEST, pil
from serving.server import TorchServe
from training.core.inputs.decode import MAX_PIXELS, PreprocessError, load_image

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "WebP": ".webp", "HEIC": ".heic"}
MIXED_SHARE = 10  # 1 request in this many is a largest image
PROBE_CLIENTS = 4


def encode(image: np.ndarray, fmt: str) -> bytes:
    if fmt == "HEIC":  # OpenCV writes no HEIF: pillow-heif, as the decoder reads it
        import pillow_heif

        pillow_heif.register_heif_opener()
        return pil(image, "HEIF")
    return cv2.imencode(FORMATS[fmt], image)[1].tobytes()


def largest_images(digit: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """{format: (size label, file)}: `digit` (28×28, white on black) as dark ink on paper, square, as large as
    the pixel limit, the body limit and the decoder's limits (decode.py: bytes a decode may hold) allow."""
    paper = 255 - digit
    limit = MAX_REQUEST
    found = {}
    for fmt in FORMATS:
        side = math.isqrt(MAX_PIXELS)
        while True:
            body = encode(cv2.resize(paper, (side, side), interpolation=cv2.INTER_LINEAR), fmt)
            if len(body) <= limit:
                break
            side = int(side * math.sqrt(limit / len(body)) * 0.98)  # uncompressed formats: bytes ~ pixels
        while not _accepted(body):  # e.g. HEIC: its decoder holds more per pixel, so fewer pixels pass
            side = int(side * 0.8)
            body = encode(cv2.resize(paper, (side, side), interpolation=cv2.INTER_LINEAR), fmt)
        found[fmt] = (f"{side}x{side}, {len(body) / 1000:,.0f} KB", body)
    return found


def _accepted(body: bytes) -> bool:
    try:
        load_image(body)
    except PreprocessError:
        return False
    return True


def worst_case_rows(server: TorchServe, folder: Path, digits: list[Path], expected: list[int],
                    seconds: int) -> list[dict]:
    """The rows above against the running `server`; `digits` are the ordinary requests (PNG files)."""
    folder.mkdir(parents=True, exist_ok=True)
    digit = cv2.imread(str(digits[0]), cv2.IMREAD_GRAYSCALE)
    assert digit is not None, digits[0]
    largest = largest_images(digit)
    token = server.token("inference") or ""
    files = {}
    rows = []
    for fmt, (size, body) in largest.items():
        files[fmt] = folder / f"largest{FORMATS[fmt]}"
        files[fmt].write_bytes(body)
        result = run_wrk(server, write_wrk_script(folder / f"{fmt}.lua", [files[fmt]], token), 1, seconds)
        rows.append({**result, "load": f"largest {fmt} only ({size})", "concurrency": 1, "probe_p99": None})
    large = list(files.values())
    mixed = [p for i, digit in enumerate(digits) for p in
             ([digit] if i % (MIXED_SHARE - 1) else [digit, large[(i // (MIXED_SHARE - 1)) % len(large)]])]
    pngs = [p.read_bytes() for p in digits]
    for label, listed in (("ordinary digits only", digits), (f"1 in {MIXED_SHARE} a largest image", mixed)):
        script = write_wrk_script(folder / f"{label.split()[0]}.lua", listed, token)
        probe = Load(server, pngs, expected, PROBE_CLIENTS, max_seconds=seconds + 30, timeout=15).start()
        result = run_wrk(server, script, 64, seconds)
        answered = [r for r in probe.stop() if r.status == 200]
        rows.append({**result, "load": label, "concurrency": 64, "probe_p99": p99_ms(answered)})
    return rows


def worst_case_table(rows: list[dict]) -> str:
    lines = ["| load | conc. | req/s | p50 ms | p99 ms | errors | ordinary digits' p99 ms (probe) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        probe = f"{r['probe_p99']:.1f}" if r["probe_p99"] is not None else ""
        lines.append(f"| {r['load']} | {r['concurrency']} | {r['rps']:,.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['non2xx'] + r['socket_errors']} | {probe} |")
    return "\n".join(lines)
