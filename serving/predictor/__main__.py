"""Serve a signed .mar with KServe's model server: `python -m serving.predictor --archive model_store/mnist.mar`.

Loopback by default (`--host 0.0.0.0` in the image: deploy/kserve/predictor.Dockerfile; server.py says why
KServe's own binding is not kept). The archive is verified and loaded before anything listens, so
`/v2/health/ready` answers only once the model is loaded; a refused archive exits 1 with one line and
never listens. SIGTERM drains the requests in flight within `--grace-period`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kserve import model_server

from serving.predictor.archive import PredictorError
from serving.predictor.model import MNISTPredictor
from serving.predictor.server import HostModelServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # KServe's own flags (--http_port ...) are spelt with underscores; this module's with hyphens.
    parser = argparse.ArgumentParser(prog="python -m serving.predictor", parents=[model_server.parser],
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path("/mnt/models/model-store/mnist.mar"),
                        help="the signed .mar (its .sig beside it); trusted keys: $MNIST_SERVE_TRUSTED_DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address REST and gRPC bind (the image: 0.0.0.0)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0,
                        help="wait this long for a batch to fill (0: run what is queued)")
    parser.add_argument("--grace-period", type=int, default=30, help="seconds SIGTERM waits for requests in flight")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--request-logs", action="store_true",
                        help="log every request (access line, step timings): off, they cost throughput under load")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The server first: its constructor sets up KServe's logging, which the load's lines then go to.
    server = HostModelServer(args.host, args.request_logs, http_port=args.http_port, grpc_port=args.grpc_port,
                             enable_grpc=args.enable_grpc, grace_period=args.grace_period)
    model = MNISTPredictor(args.archive, args.max_batch_size, args.max_batch_delay_ms / 1000, args.device)
    try:
        model.load()
    except PredictorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
