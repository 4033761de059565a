"""The worst-case budget of one request: decoding and preprocessing any image a client can send costs at
most BUDGET_CPU_S of CPU time and BUDGET_MB of memory above what the process held before, and ends in a
28×28 digit or a PreprocessError (the handler's 400). Nothing else.

Measured in a subprocess of its own, the way a TorchServe worker runs the code (cv2 with one thread,
decoders warmed up): CPU time with time.process_time() (not wall time: the machine is shared), memory
as the rise of the resident high-water mark (VmHWM, reset through /proc/self/clear_refs before each
input). malloc's dynamic mmap threshold is pinned so that freed buffers go back to the system and the
next input's rise is its own. A fixed corpus (bench/worst_cases.py: each format at its limits, and the
slowest inputs the search below has found) and a derandomized property-based search over adversarial
images; `BUDGET_EXAMPLES=400` searches longer.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from bench.worst_cases import (
    CASES,
    MAX_REQUEST,
    digit_page,
    exif_blob,
    jpeg_with_app1,
    pil,
    png,
    worst_cases,
)
from training.core.inputs.decode import MAX_PIXELS

BUDGET_CPU_S = 0.150
BUDGET_MB = 64
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("BUDGET_EXAMPLES", "30"))
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

MEASURE = textwrap.dedent('''
    import ctypes, io, json, re, sys, time
    import numpy as np, cv2
    from PIL import Image
    from training.core.inputs.preprocess import PreprocessError, preprocess_bytes

    libc = ctypes.CDLL("libc.so.6")

    def status(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

    def measure(data):
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before, start = status("VmRSS"), time.process_time()
        try:
            preprocess_bytes(data)
            outcome = "digit"
        except PreprocessError as err:
            outcome = "refused: " + str(err)
        except Exception as err:  # the budget test fails on it: only PreprocessError may escape
            outcome = f"error: {type(err).__name__}: {err}"
        return {"cpu_s": time.process_time() - start, "extra_mb": status("VmHWM") - before, "outcome": outcome}

    page = np.full((300, 300), 255, np.uint8)
    cv2.line(page, (80, 60), (220, 240), 0, 20)
    for ext in (".png", ".jpg", ".webp", ".bmp"):  # every decoder once, as a warm worker has
        measure(cv2.imencode(ext, page)[1].tobytes())
    import pillow_heif
    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    Image.fromarray(page).convert("RGB").save(buffer, "HEIF")
    measure(buffer.getvalue())
    for line in sys.stdin:
        print(json.dumps(measure(open(line.strip(), "rb").read())), flush=True)
''')


class Meter:
    """One long-lived measuring subprocess: send a file, get its cost and outcome back."""

    def __init__(self, folder: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
        self.folder, self.n = folder, 0
        self.process = subprocess.Popen([sys.executable, "-c", MEASURE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def __call__(self, data: bytes) -> dict:
        """The input's cost; over budget, the least of three runs: the work is the same each time, and
        what a neighbour's load adds to it (a shared core, a cold cache) is not the input's cost."""
        cost = self.once(data)
        for _ in range(2):
            if cost["cpu_s"] <= BUDGET_CPU_S and cost["extra_mb"] <= BUDGET_MB:
                break
            again = self.once(data)
            cost = {**cost, "cpu_s": min(cost["cpu_s"], again["cpu_s"]),
                    "extra_mb": min(cost["extra_mb"], again["extra_mb"])}
        return cost

    def once(self, data: bytes) -> dict:
        self.n += 1
        path = self.folder / f"{self.n}.bin"
        path.write_bytes(data)
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        path.unlink()
        assert line, "the measuring process died (a crash in a decoder?)"
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="module")
def meter(tmp_path_factory):
    m = Meter(tmp_path_factory.mktemp("budget"))
    yield m
    m.close()


def assert_within_budget(cost: dict, name: str) -> None:
    assert not cost["outcome"].startswith("error"), f"{name}: {cost['outcome']}"
    assert cost["cpu_s"] <= BUDGET_CPU_S, f"{name}: {cost['cpu_s'] * 1000:.0f} ms of CPU ({cost['outcome'][:60]})"
    assert cost["extra_mb"] <= BUDGET_MB, f"{name}: {cost['extra_mb']:.0f} MB ({cost['outcome'][:60]})"


@pytest.mark.parametrize("name", list(CASES))
def test_each_worst_case_is_answered_or_refused_within_budget(meter, name):
    data = worst_cases([name]).get(name)
    if data is None:
        pytest.skip(f"{name} is over the {MAX_REQUEST:,}-byte request limit: TorchServe refuses it")
    assert_within_budget(meter(data), name)


def test_a_16_megapixel_16_bit_rgba_png_is_refused_from_its_header(meter):
    """It cost ~1.5 s of CPU and ~490 MB to decode (and 128 MB of it is pixel data a digit never needs)."""
    cost = meter(worst_cases(["16-bit RGBA PNG, 4000x4000"])["16-bit RGBA PNG, 4000x4000"])
    assert cost["outcome"].startswith("refused: image too large to decode: 4000x4000 PNG needs 128 MB decoded")
    assert_within_budget(cost, "16-bit RGBA PNG")


@pytest.mark.parametrize("name", ["grey PNG, 4000x4000 (the decode limit)", "baseline JPEG, 4000x4000",
                                  "interlaced grey PNG, 4000x4000", "RGBA PNG, 2000x2000 (the decode limit)"])
def test_a_large_picture_of_a_digit_is_still_read_within_budget(meter, name):
    """Decoded small (JPEG at 1/4 scale) or shrunk to WORK_PIXELS at once: a 16 MP grey PNG of a 7 cost
    ~400 ms and ~120 MB before, all of it spent on pixels far finer than a 20-px digit."""
    cost = meter(worst_cases([name])[name])
    assert cost["outcome"] == "digit"
    assert_within_budget(cost, name)


# --- the property-based search ---------------------------------------------------------------------


@st.composite
def shapes(draw) -> tuple[int, int]:
    """(height, width) of up to MAX_PIXELS, with any aspect ratio from square to a strip 8 px wide."""
    pixels = int(10 ** draw(st.floats(2.5, np.log10(MAX_PIXELS))))
    ratio = 10 ** draw(st.floats(-4, 4))
    height = int(np.clip(round(np.sqrt(pixels * ratio)), 8, pixels // 8))
    return height, max(8, pixels // height)


@st.composite
def contents(draw, shape: tuple[int, int]) -> tuple[str, np.ndarray]:
    height, width = shape
    kind = draw(st.sampled_from(["digit", "dots", "noise", "blank", "stripes"]))
    if kind == "digit":
        return kind, digit_page(height, width)
    page = np.full(shape, 255, np.uint8)
    if kind == "dots":
        step = draw(st.integers(2, 6))
        page[1::step, 1::step] = 0
    elif kind == "noise":  # incompressible: only small pictures fit the request limit
        rng = np.random.default_rng(draw(st.integers(0, 9)))
        box = rng.integers(0, 256, (min(height, 400), min(width, 400)), np.uint8)
        page[: box.shape[0], : box.shape[1]] = box
    elif kind == "stripes":
        step = draw(st.integers(2, 9))
        page[:, ::step] = 0
    return kind + (f" every {step} px" if kind in ("dots", "stripes") else ""), page


@st.composite
def encodings(draw) -> tuple[str, bytes]:
    """(how it was made, the bytes): the description is what a fixed regression case is rebuilt from."""
    shape = draw(shapes())
    content, gray = draw(contents(shape))
    fmt = draw(st.sampled_from(["png", "png16", "png1", "png-palette", "png-rgba", "png-interlaced", "jpeg",
                                "jpeg-progressive", "jpeg-exif", "webp", "bmp", "gif", "tiff", "heif"]))
    rgb = np.repeat(gray[..., None], 3, 2)
    if fmt in ("heif", "bmp", "tiff", "gif") or fmt.startswith("webp"):
        assume(gray.size <= 2_500_000)  # larger ones are refused from their header; encoding them is slow
    make = {
        "png": lambda: png(gray, 0),
        "png16": lambda: png(gray.astype(np.uint16) * 257, 0, 16),
        "png1": lambda: png(np.packbits(gray > 127, axis=1), 0, 1, width=gray.shape[1]),
        "png-palette": lambda: png(gray // 255, 3, palette=bytes(3) + b"\xff" * 3),
        "png-rgba": lambda: png(np.dstack([rgb, 255 - gray]), 6),
        "png-interlaced": lambda: png(gray, 0, interlaced=True),
        "jpeg": lambda: pil(gray, "JPEG", quality=draw(st.integers(5, 95))),
        "jpeg-progressive": lambda: pil(rgb, "JPEG", progressive=True, quality=draw(st.integers(5, 95))),
        "jpeg-exif": lambda: jpeg_with_app1(gray, exif_blob(draw(st.integers(1, 5000)))),
        "webp": lambda: pil(gray, "WEBP", lossless=draw(st.booleans())),
        "bmp": lambda: pil(gray, "BMP"),
        "gif": lambda: pil(gray, "GIF"),
        "tiff": lambda: pil(gray, "TIFF"),
        "heif": lambda: pil(rgb, "HEIF", quality=30),
    }[fmt]
    try:
        data = make()
    except (OSError, ValueError, OverflowError, struct.error):  # beyond the encoder (JPEG: 65,500 px a side)
        assume(False)
    cut = draw(st.sampled_from([None, None, None, 0.5, 0.9, 0.99]))  # truncated uploads
    if cut is not None:
        data = data[: max(1, int(len(data) * cut))]
    assume(len(data) <= MAX_REQUEST)
    return f"{fmt}, {content}, {shape[0]}x{shape[1]}" + (f", cut at {cut:.0%}" if cut else ""), data


SLOWEST: list[tuple[float, float, str]] = []  # (CPU s, MB, description): printed after the search (-s)


@settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(example=encodings())
def test_any_adversarial_image_is_answered_or_refused_within_budget(meter, example):
    name, data = example
    cost = meter(data)
    # Steer the search towards the costliest inputs (targeted property-based testing).
    target(cost["cpu_s"], label="CPU s")
    target(cost["extra_mb"], label="MB")
    SLOWEST.append((cost["cpu_s"], cost["extra_mb"], f"{name} ({len(data):,} bytes): {cost['outcome'][:50]}"))
    assert_within_budget(cost, name)


def test_the_costliest_inputs_found_are_printed():
    """Run with -s after the search: the costliest inputs, candidates for bench/worst_cases.py."""
    for cpu, mb, name in sorted(SLOWEST, reverse=True)[:8]:
        print(f"{cpu * 1000:5.0f} ms {mb:4.0f} MB  {name}")
    for cpu, mb, name in sorted(SLOWEST, key=lambda c: -c[1])[:4]:
        print(f"{cpu * 1000:5.0f} ms {mb:4.0f} MB  {name}")
