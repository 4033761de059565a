"""`make serve | predict | status | token | stop`: `python -m serving.cli COMMAND`.

Every failure is one line on stderr that says what to do, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil

from serving.client import ROOT, ServerClient
from serving.errors import ServerError
from serving.server import TorchServe
from serving.store import archive_version, default_record
from training.cli import ArgumentParser


def _start(server: TorchServe, foreground: bool) -> int:
    if not server.auth:
        print("WARNING: token authorization is OFF: anyone who can reach the ports can use and manage the model",
              file=sys.stderr)
    mar = server.start()
    name = server.model_name
    print(f"TorchServe is up: model {name} {archive_version(mar)} ({mar.name}) ready; logs and tokens in "
          f"{server.run_dir}/")
    if mar.name != f"{name}.mar":
        print(f"({mar.name}, not {name}.mar: {default_record(server.model_store, name)} keeps the default chosen by "
              f"the last `make promote` or `make rollback`; the next `make archive` resets it)")
    auth = ' -H "Authorization: Bearer $(make -s token)"' if server.auth else ""
    # A content type matters: curl's default (form-urlencoded) makes TorchServe parse the image as a form.
    print(f"try:  curl{auth} -H 'Content-Type: application/octet-stream' --data-binary @serving/samples/7.png "
          f"{server.url('inference', f'/predictions/{name}')}")
    if not foreground:
        print("stop: make stop")
        return 0
    # Containers: stay in the foreground and turn SIGTERM/SIGINT into a clean stop.
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    while not stopping and server.running_pid() is not None:
        time.sleep(0.5)
    server.stop()
    return 0 if stopping else 1


def _worker_memory(worker: dict) -> str:
    """TorchServe's memoryUsage comes from its system metrics (0 until they run, or when they are off):
    the worker process's resident memory, read here, instead."""
    try:
        return f"{psutil.Process(int(worker['pid'])).memory_info().rss / 2**20:.0f} MiB"
    except (KeyError, TypeError, ValueError, psutil.Error):
        return "n/a"


def served_variants(server: TorchServe, version: str) -> str:
    """The variants `version`'s workers report serving (auto: what each chose at start), from the
    handler's mnist_worker_variant gauge; "unknown" before a worker reported or for other handlers."""
    from serving.drain import parse_samples

    try:
        status, body = server.request("metrics", "/metrics")
    except ServerError:
        return "unknown"
    text = body.decode(errors="replace") if status == 200 else ""
    found = sorted({dict(labels).get("Variant", "?") for (name, labels), value in parse_samples(text).items()
                    if name == "mnist_worker_variant" and value and dict(labels).get("ModelVersion") == version})
    return ", ".join(found) or "unknown"


def _status(server: TorchServe) -> int:
    if server.running_pid() is None:
        print("TorchServe is not running")
        return 1
    info = server.describe()
    print(f"model {info['modelName']} version {info['modelVersion']}  batch {info['batchSize']}  "
          f"max delay {info['maxBatchDelay']} ms  variant {served_variants(server, str(info['modelVersion']))}")
    for w in info["workers"]:
        print(f"  worker {w['id']}  {w['status']}  pid {w['pid']}  gpu {w['gpu']}  memory {_worker_memory(w)}")
    return 0


def _predict(client: ServerClient, image: Path) -> int:
    if not image.is_file():
        raise ServerError(f"no such image: {image}")
    status, body = client.predict(image.read_bytes())
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m serving.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start TorchServe and wait until the model's workers are READY")
    start.add_argument("--auth", choices=("on", "off"), default="on")
    start.add_argument("--model-api", choices=("on", "off"), default="off",
                       help="allow `make deploy` to register versions from the model store (URLs stay refused)")
    start.add_argument("--foreground", action="store_true", help="stay attached; stop on SIGTERM/SIGINT")
    predict = sub.add_parser("predict", help="send an image to the running server")
    predict.add_argument("image", type=Path)
    status = sub.add_parser("status", help="models and workers of the running server")
    stop = sub.add_parser("stop", help="stop the server and its workers")
    token = sub.add_parser("token", help="print a bearer key from the token file")
    token.add_argument("kind", choices=("inference", "management"), nargs="?", default="inference")
    for p in (start, predict, status, stop, token):
        p.add_argument("--model-name", default="mnist")
        p.add_argument("--model-store", default=ROOT / "model_store", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = getattr(args, "auth", "on") == "on"
    try:
        if args.command != "start":  # the token file says whether the running server uses auth
            auth = (Path(os.environ.get("SERVE_DIR", ROOT / "logs")) / "key_file.json").exists()
        server = TorchServe(model_store=args.model_store, model_name=args.model_name, auth=auth)
        if getattr(args, "model_api", "off") == "on":
            server.extra_properties["enable_model_api"] = "true"  # allowed_urls still limits it to the store
        if args.command == "start":
            return _start(server, args.foreground)
        if args.command == "stop":
            print("TorchServe stopped" if server.stop() else "TorchServe was not running")
        elif args.command == "token":
            if server.running_pid() is None:  # no key file either: an empty token would look like auth off
                raise ServerError("TorchServe is not running: `make serve` first")
            print(server.token(args.kind) or "")
        elif args.command == "status":
            return _status(server)
        elif args.command == "predict":
            return _predict(server, args.image)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
