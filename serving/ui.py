"""A web page to draw or photograph a digit and see the answer: `make ui`, `python -m serving.ui`.

`start` runs the page's backend (serving/page.py) in the background on 127.0.0.1 and a free port,
beside the running TorchServe, with its pid file in TorchServe's run directory (logs/), so
`make stop` stops both. `run` serves in the foreground.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from serving.feedback.service import FeedbackService
from serving.page import PageServer
from serving.server import TorchServe, free_port
from training.cli import ArgumentParser
from training.feedback.store import FeedbackStore, FeedbackStoreError

PID_FILE = "ui.pid"
LOG_FILE = "ui.log"


class UIError(RuntimeError):
    """The page could not be started or stopped; the message says what to do."""


def _torchserve(model_name: str) -> TorchServe:
    """The server `make serve` started (SERVE_DIR, *_ADDRESS): auth is on where it left a token file."""
    server = TorchServe(model_name=model_name)
    server.auth = (server.run_dir / "key_file.json").exists()
    return server


def running_pid(run_dir: Path) -> int | None:
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
        return pid if "serving.ui" in " ".join(psutil.Process(pid).cmdline()) else None
    except (OSError, ValueError, psutil.Error):
        return None


def run(torchserve: TorchServe, host: str, port: int) -> int:
    """Serve in the foreground until SIGTERM or Ctrl-C, with a pid file beside TorchServe's. Corrections go
    to the feedback store ($MNIST_FEEDBACK_DB, else feedback/feedback.db); where it cannot be opened the
    page still answers, and says so in its log."""
    feedback = None
    try:
        feedback = FeedbackService(FeedbackStore())
    except FeedbackStoreError as err:
        print(f"WARNING: corrections are not stored: {err}", file=sys.stderr, flush=True)
    page = PageServer(torchserve, host, port, feedback=feedback)
    pid_file = torchserve.run_dir / PID_FILE
    torchserve.run_dir.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=page.shutdown).start())
    print(f"page: {page.url}  (TorchServe at {torchserve.url('inference')})", flush=True)
    try:
        page.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        page.server_close()
        pid_file.unlink(missing_ok=True)
    return 0


def start(torchserve: TorchServe, host: str, port: int, timeout: float = 30) -> str:
    """Start `run` as a background process and return the page's URL once it answers."""
    run_dir = torchserve.run_dir
    if (pid := running_pid(run_dir)) is not None:
        raise UIError(f"the page is already running (pid {pid}): `make stop` first")
    if torchserve.running_pid() is None:
        raise UIError(f"TorchServe is not running from {run_dir}: `make serve` first (`make ui` does it for you)")
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "serving.ui", "--model-name", torchserve.model_name, "run",
           "--host", host, "--port", str(port)]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOG_FILE).open("ab") as log:
        child = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise UIError(f"the page's server exited ({child.returncode}); see {run_dir / LOG_FILE}")
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2):
                return url
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    child.terminate()
    raise UIError(f"the page did not answer within {timeout:.0f}s; see {run_dir / LOG_FILE}")


def stop(run_dir: Path, timeout: float = 10) -> bool:
    pid = running_pid(run_dir)
    if pid is None:
        (run_dir / PID_FILE).unlink(missing_ok=True)
        return False
    process = psutil.Process(pid)
    process.terminate()
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(5)
    (run_dir / PID_FILE).unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="mnist")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("start", "start the page in the background (TorchServe must be running)"),
                       ("run", "serve the page in the foreground")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", default=os.environ.get("UI_HOST", "127.0.0.1"),
                       help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=int(os.environ.get("UI_PORT", "0")),
                       help="port (default: a free one, printed)")
    sub.add_parser("stop", help="stop the page started by `start`")
    args = parser.parse_args(argv)
    torchserve = _torchserve(args.model_name)
    if getattr(args, "host", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: the page binds {args.host}: anyone who can reach it can use the model", file=sys.stderr)
    try:
        if args.command == "run":
            return run(torchserve, args.host, args.port)
        if args.command == "start":
            print(f"page: {start(torchserve, args.host, args.port)}  (logs in {torchserve.run_dir / LOG_FILE})")
            print("stop: make stop")
        else:
            print("page stopped" if stop(torchserve.run_dir) else "page was not running")
    except (UIError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
