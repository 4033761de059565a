"""What one request's decoding costs a worker, in-process: `python -m bench.decode`.

Times `serving.worker.requests.decode_request` (bytes → the 28×28 digit the model sees: header check,
decode, polarity or the full MNIST-style preparation) on the bodies clients send, one thread, and
prints µs per request (best of --repeats rounds over 32 different test digits). The served rate at
64 connections is bound by the workers' per-request CPU, so this is the decode share of it.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import timeit

import cv2
import numpy as np
import torch

from bench.report import machine_line
from serving.worker.requests import decode_request
from training.data import load_split


def bodies(digits: np.ndarray) -> dict[str, list[dict]]:
    """Per input kind, one request per digit, as the handler receives it from TorchServe."""
    def canvas(digit: np.ndarray) -> bytes:  # the web page: 280×280 RGBA, dark ink on transparent paper
        big = cv2.resize(255 - digit, (280, 280), interpolation=cv2.INTER_LINEAR)
        return cv2.imencode(".png", np.dstack([big, big, big, 255 - big]))[1].tobytes()

    png = [cv2.imencode(".png", d)[1].tobytes() for d in digits]
    return {
        "28×28 PNG (raw body)": [{"body": p} for p in png],
        "28×28 PNG as JSON base64": [{"body": json.dumps({"data": base64.b64encode(p).decode()}).encode()}
                                     for p in png],
        "JSON pixels": [{"body": json.dumps({"pixels": d.tolist()}).encode()} for d in digits],
        "280×280 RGBA canvas PNG": [{"body": canvas(d)} for d in digits],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=100, help="passes over the 32 digits per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images, _ = load_split(args.data_dir, train=False)
    digits = images[:32].numpy()
    print(f"{machine_line()}; 1 thread, µs per request (best of {args.repeats} rounds)")
    print("| input | µs per request |\n|---|---:|")
    for name, requests in bodies(digits).items():
        def run(requests=requests) -> None:
            for request in requests:
                decode_request(request)
        number = max(1, args.number // (10 if "canvas" in name else 1))
        best = min(timeit.repeat(run, number=number, repeat=args.repeats)) / number / len(requests)
        print(f"| {name} | {best * 1e6:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
