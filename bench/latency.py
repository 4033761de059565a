"""Latency of one request at a time, /predictions vs /explanations, on a real TorchServe: `make latency`.

Starts its own server on free loopback ports from a fresh archive of CHECKPOINT, sends the first
N MNIST test digits one after another to each endpoint (warm-up excluded), prints percentiles and
stops the server. Sequential on purpose: it measures what one explanation costs a client, not
throughput (that is `make bench-serve`). It also times, in-process, what the trust features add to
a batch of 32 on /predictions: the detector's features and score, and the temperature.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.record import write_record
from serving.archive import build_archive
from serving.server import TorchServe
from serving.worker.variants import serving_model, to_model_input
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.core.model import Net
from training.core.ood import features_and_logits, is_digit, ood_score
from training.data import load_split


def _post(server: TorchServe, path: str, body: bytes, token: str) -> float:
    request = urllib.request.Request(server.url("inference", path), body, method="POST",
                                     headers={"Content-Type": "image/png", "Authorization": f"Bearer {token}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    return time.perf_counter() - start


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return (f"p50 {pick(0.5):7.1f} ms  p90 {pick(0.9):7.1f} ms  p99 {pick(0.99):7.1f} ms  "
            f"mean {statistics.mean(ms):7.1f} ms")


def added_cost(checkpoint: Path, digits: np.ndarray, repeats: int = 50, rounds: int = 7) -> tuple[float, float]:
    """Seconds per batch of 32: the plain forward and softmax vs. forward + detector + temperature.

    The best of `rounds` interleaved rounds: on a shared machine the minimum is the figure that
    other jobs disturb least.
    """
    ckpt = load_checkpoint(checkpoint)
    model = serving_model(model_from_checkpoint(ckpt), "fused")
    assert isinstance(model, Net)  # fused: the CNN itself, batch norm folded
    detector, temperature = ckpt.get("ood"), float(ckpt.get("temperature", 1.0))
    x = to_model_input(digits[:32])
    torch.set_num_threads(1)  # as a worker runs

    def plain():
        torch.softmax(model(x), 1)

    def trusted():
        features, logits = features_and_logits(model, x)
        torch.softmax(logits / temperature, 1)
        if detector is not None:
            is_digit(detector, ood_score(detector, features, logits))

    times = {"plain": float("inf"), "trusted": float("inf")}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in (("plain", plain), ("trusted", trusted)):
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                times[name] = min(times[name], (time.perf_counter() - start) / repeats)
    return times["plain"], times["trusted"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    images, _ = load_split(None, train=False)
    digits = images[: args.requests + 10].numpy()
    pngs = [cv2.imencode(".png", d)[1].tobytes() for d in digits]
    plain, trusted = added_cost(args.checkpoint, digits)
    print(f"in-process, batch of 32, 1 thread, best of 7: forward+softmax {plain * 1000:.2f} ms, "
          f"+ detector and temperature {trusted * 1000:.2f} ms ({trusted / plain - 1:+.1%})")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-latency-") as tmp:
        archive = build_archive(args.checkpoint, Path(tmp) / "store", "mnist", "1.0")
        server = TorchServe.on_free_ports(Path(tmp) / "run", archive.path.parent, model_name="mnist", auth=True)
        server.start(timeout=180)
        try:
            token = server.token("inference")
            assert token is not None  # started with auth=True
            for endpoint in ("/predictions/mnist", "/explanations/mnist"):
                for png in pngs[:10]:  # warm-up
                    _post(server, endpoint, png, token)
                seconds = [_post(server, endpoint, png, token) for png in pngs[10:]]
                print(f"{endpoint:<20} {len(seconds)} sequential requests: {percentiles(seconds)}")
                rows.append({"endpoint": endpoint, "requests": len(seconds), "latency": percentiles(seconds)})
        finally:
            server.stop()
    write_record("latency", {"tables": {"sequential requests": rows},
                             "in_process_batch32_ms": {"plain": plain * 1000, "with_trust": trusted * 1000}},
                 baseline={"endpoint": "/predictions/mnist (same run)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
