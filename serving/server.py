"""Run TorchServe over model_store/: `make serve | predict | status | stop`, `python -m serving.server`.

Each server gets a run directory (env SERVE_DIR, default `logs/`) holding its effective
config.properties, its token file (key_file.json), its logs and its pid file. TorchServe keeps its
pid file in $TMPDIR and its token file in the working directory, so pointing both at the run
directory lets several servers (a user's and a test's) coexist and stop cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil

from training.data import sha256_of

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "configs" / "config.properties"
DEFAULT_ADDRESSES = {"inference": "127.0.0.1:8080", "management": "127.0.0.1:8081", "metrics": "127.0.0.1:8082"}
# TorchServe also opens gRPC (on loopback); unused here, but its ports must be free and distinct per server.
DEFAULT_GRPC_PORTS = {"grpc_inference_port": 7070, "grpc_management_port": 7071}


class ServerError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says what to do."""


def java_major_version() -> int | None:
    java = shutil.which("java", path=os.path.join(os.environ["JAVA_HOME"], "bin")) if os.environ.get("JAVA_HOME") \
        else shutil.which("java")
    if java is None:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major  # "1.8" means Java 8


def check_java() -> None:
    major = java_major_version()
    if major is None or major < 11:
        found = "no java on PATH" if major is None else f"Java {major}"
        raise ServerError(f"TorchServe needs Java 11+ (17 recommended), found {found}: "
                          "install it, e.g. `sudo apt-get install openjdk-17-jre-headless`")


def _address(kind: str) -> str:
    value = os.environ.get(f"{kind.upper()}_ADDRESS") or DEFAULT_ADDRESSES[kind]
    return value if "://" in value else f"http://{value}"


@dataclass
class TorchServe:
    run_dir: Path = field(default_factory=lambda: Path(os.environ.get("SERVE_DIR", ROOT / "logs")))
    model_store: Path = ROOT / "model_store"
    model_name: str = "mnist"
    auth: bool = True
    addresses: dict[str, str] = field(default_factory=lambda: {k: _address(k) for k in DEFAULT_ADDRESSES})
    grpc_ports: dict[str, int] = field(default_factory=lambda: {
        k: int(os.environ.get(k.upper(), v)) for k, v in DEFAULT_GRPC_PORTS.items()})
    extra_properties: dict[str, str] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, run_dir: Path, model_store: Path, **kwargs: Any) -> TorchServe:
        """A server on free loopback ports: for tests and benchmarks beside any other TorchServe."""
        return cls(run_dir=run_dir, model_store=model_store,
                   addresses={k: f"http://127.0.0.1:{free_port()}" for k in DEFAULT_ADDRESSES},
                   grpc_ports={k: free_port() for k in DEFAULT_GRPC_PORTS}, **kwargs)

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    def url(self, kind: str, path: str = "") -> str:
        return self.addresses[kind] + path

    # --- lifecycle -------------------------------------------------------------------------------

    def write_properties(self) -> Path:
        """The template with this server's addresses, store, URL allow-list and auth applied."""
        props = {
            "inference_address": self.addresses["inference"],
            "management_address": self.addresses["management"],
            "metrics_address": self.addresses["metrics"],
            "model_store": str(self.model_store.resolve()),
            "allowed_urls": f"file://{re.escape(str(self.model_store.resolve()))}/.*\\\\.mar",
            "metrics_config": str(ROOT / "configs" / "metrics.yaml"),
            "disable_token_authorization": "false" if self.auth else "true",
            **{k: str(v) for k, v in self.grpc_ports.items()},
            # The worker's unix socket lives in java.io.tmpdir (/tmp/.ts.sock.9000 by default) and a new
            # worker deletes an existing one: per-run, so two servers never share or remove each other's.
            "vmargs": f"{_template_value('vmargs')} -Djava.io.tmpdir={self.run_dir.resolve() / 'tmp'}",
            **self.extra_properties,
        }
        lines, seen = [], set()
        for line in TEMPLATE.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if "=" in line and not line.lstrip().startswith("#") and key in props:
                line, _ = f"{key}={props[key]}", seen.add(key)
            lines.append(line)
        lines += [f"{k}={v}" for k, v in props.items() if k not in seen]
        path = self.run_dir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            return pid if "org.pytorch.serve.ModelServer" in psutil.Process(pid).cmdline() else None
        except (OSError, ValueError, psutil.Error):
            return None

    def start(self, timeout: float = 120) -> None:
        check_java()
        mar = self.model_store / f"{self.model_name}.mar"
        if not mar.is_file():
            raise ServerError(f"no archive at {mar}: run `make archive` first")
        verify_checksum(mar)
        if (pid := self.running_pid()) is not None:
            raise ServerError(f"TorchServe is already running from {self.run_dir} (pid {pid}): `make stop` first")
        for kind, url in self.addresses.items():
            host, port = url.split("://")[1].rsplit(":", 1)
            if not port_is_free(host, int(port)):
                raise ServerError(f"{kind} address {host}:{port} is in use: stop what uses it or set "
                                  f"{kind.upper()}_ADDRESS")
        for key, port in self.grpc_ports.items():
            if not port_is_free("127.0.0.1", port):
                raise ServerError(f"gRPC port {port} is in use (another TorchServe?): stop it or set {key.upper()}")
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)  # stale: its process is gone (checked above)
        (self.run_dir / "key_file.json").unlink(missing_ok=True)
        config = self.write_properties()
        env = {**os.environ, "TMPDIR": str(self.run_dir / "tmp"), "LOG_LOCATION": str(self.run_dir),
               "METRICS_LOCATION": str(self.run_dir),
               # Hand the handler raw bytes: it parses JSON itself, so one code path sees every input.
               "TS_DECODE_INPUT_REQUEST": "false"}
        torchserve = Path(sys.executable).parent / "torchserve"
        cmd = [str(torchserve), "--start", "--ncs", "--model-store", str(self.model_store.resolve()),
               "--models", f"{self.model_name}={mar.name}", "--ts-config", str(config)]
        with (self.run_dir / "console.log").open("ab") as console:
            subprocess.run(cmd, cwd=self.run_dir, env=env, stdout=console, stderr=subprocess.STDOUT,
                           start_new_session=True, check=True, timeout=60)
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float) -> None:
        """Wait until every worker of the model is READY. `/ping` is not enough: it answers
        Healthy while workers crash in a loop (a missing Python package, say)."""
        deadline = time.monotonic() + timeout
        last, failures = "no answer yet", 0
        while time.monotonic() < deadline:
            pid = self.running_pid()
            if pid is None and time.monotonic() > deadline - timeout + 5:
                raise ServerError(f"TorchServe exited during start-up; see {self.run_dir}/console.log:\n"
                                  + self.log_tail("console.log"))
            if (failures := self.failed_worker_loads()) >= 3:
                break  # a crash loop: waiting longer only repeats it
            try:
                workers = self.describe()["workers"]
                states = [w["status"] for w in workers]
                if states and all(s == "READY" for s in states):
                    return
                last = f"workers {states}"
            except (ServerError, KeyError, IndexError) as err:
                last = str(err)
            time.sleep(0.5)
        self.stop()
        if failures >= 3:
            raise ServerError(f"the model's workers died {failures} times while loading; worker log "
                              f"({self.run_dir}/model_log.log):\n" + self.log_tail("model_log.log"))
        raise ServerError(f"model {self.model_name} not ready after {timeout:.0f}s ({last}); "
                          f"worker log ({self.run_dir}/model_log.log):\n" + self.log_tail("model_log.log"))

    def failed_worker_loads(self) -> int:
        log = self.run_dir / "ts_log.log"
        return log.read_text(errors="replace").count("Load model failed") if log.exists() else 0

    def stop(self, timeout: float = 30) -> bool:
        """Stop the frontend and its workers; SIGKILL whatever outlives `timeout`. False if none ran."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            frontend = psutil.Process(pid)
            processes = [frontend, *frontend.children(recursive=True)]
        except psutil.Error:
            return False
        for p in processes[:1]:
            p.terminate()  # the frontend stops its own workers on SIGTERM
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)
        self.pid_file.unlink(missing_ok=True)
        (self.run_dir / "key_file.json").unlink(missing_ok=True)
        return True

    def log_tail(self, name: str = "ts_log.log", lines: int = 15) -> str:
        path = self.run_dir / name
        if not path.exists():
            path = self.run_dir / "console.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    # --- API calls -------------------------------------------------------------------------------

    def token(self, kind: str) -> str | None:
        """The bearer key for `inference` or `management` calls (None when auth is off).

        TorchServe's keys expire (60 minutes by default); an expired one is renewed with the API
        key, which rewrites the key file, so a long-running server keeps answering `make predict`.
        """
        if not self.auth:
            return None
        keys = self._read_keys()
        if kind not in keys:
            raise ServerError(f"no {kind} key in {self.run_dir / 'key_file.json'}")
        expires = keys[kind].get("expiration time", "")
        if expires and datetime.fromisoformat(expires[:19]).replace(tzinfo=timezone.utc) < \
                datetime.now(timezone.utc) + timedelta(seconds=30):
            req = urllib.request.Request(self.url("management", f"/token?type={kind}"),
                                         headers={"Authorization": f"Bearer {keys['API']['key']}"})
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except (urllib.error.URLError, OSError) as err:
                raise ServerError(f"the {kind} key expired and could not be renewed: {err}") from None
            keys = self._read_keys()
        return keys[kind]["key"]

    def _read_keys(self) -> dict[str, Any]:
        path = self.run_dir / "key_file.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise ServerError(f"no token file at {path}: is the server running (`make serve`)?") from None

    def request(self, kind: str, path: str, data: bytes | None = None, method: str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
        headers = dict(headers or {})
        token_kind = "management" if kind == "management" else "inference"
        if kind != "metrics" and (key := self.token(token_kind)):
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url(kind, path), data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError) as err:
            raise ServerError(f"cannot reach {self.url(kind, path)}: {getattr(err, 'reason', err)}") from None

    def describe(self) -> dict[str, Any]:
        status, body = self.request("management", f"/models/{self.model_name}")
        if status != 200:
            raise ServerError(f"management API answered {status}: {body[:200].decode(errors='replace')}")
        return json.loads(body)[0]

    def predict(self, image: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
        status, body = self.request("inference", f"/predictions/{self.model_name}", data=image,
                                    headers={"Content-Type": content_type})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body.decode(errors="replace")}


def _template_value(key: str) -> str:
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    return ""


def verify_checksum(mar: Path) -> None:
    """Refuse an archive whose bytes differ from what `make archive` recorded beside it."""
    recorded = mar.with_name(mar.name + ".sha256")
    if not recorded.exists():
        raise ServerError(f"{recorded} is missing: rebuild the archive with `make archive`")
    expected = recorded.read_text().split()[0]
    if sha256_of(mar) != expected:
        raise ServerError(f"{mar} does not match the SHA-256 recorded by `make archive` ({expected[:12]}…): "
                          "it was modified or corrupted; rebuild it with `make archive ARGS=--force`")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start(server: TorchServe, foreground: bool) -> int:
    if not server.auth:
        print("WARNING: token authorization is OFF: anyone who can reach the ports can use and manage the model",
              file=sys.stderr)
    server.start()
    name = server.model_name
    print(f"TorchServe is up: model {name} ready; logs and tokens in {server.run_dir}/")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--model-store", default=str(ROOT / "model_store"), type=Path)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start TorchServe and wait until the model's workers are READY")
    start.add_argument("--auth", choices=("on", "off"), default="on")
    start.add_argument("--foreground", action="store_true", help="stay attached; stop on SIGTERM/SIGINT")
    predict = sub.add_parser("predict", help="send an image to the running server")
    predict.add_argument("image", type=Path)
    sub.add_parser("status", help="models and workers of the running server")
    sub.add_parser("stop", help="stop the server and its workers")
    token = sub.add_parser("token", help="print a bearer key from the token file")
    token.add_argument("kind", choices=("inference", "management"), nargs="?", default="inference")
    # Options also accepted after the sub-command (`start --model-name x`), as the Makefile passes them.
    for p in (start, predict):
        p.add_argument("--model-name", default=argparse.SUPPRESS)
        p.add_argument("--model-store", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    auth = getattr(args, "auth", "on") == "on"
    if args.command != "start":  # the token file says whether the running server uses auth
        auth = (Path(os.environ.get("SERVE_DIR", ROOT / "logs")) / "key_file.json").exists()
    server = TorchServe(model_store=args.model_store, model_name=args.model_name, auth=auth)
    try:
        if args.command == "start":
            return _start(server, args.foreground)
        if args.command == "stop":
            print("TorchServe stopped" if server.stop() else "TorchServe was not running")
        elif args.command == "token":
            print(server.token(args.kind) or "")
        elif args.command == "status":
            if server.running_pid() is None:
                print("TorchServe is not running")
                return 1
            info = server.describe()
            print(f"model {info['modelName']} version {info['modelVersion']}  batch {info['batchSize']}  "
                  f"max delay {info['maxBatchDelay']} ms")
            for w in info["workers"]:
                print(f"  worker {w['id']}  {w['status']}  pid {w['pid']}  gpu {w['gpu']}  memory {w['memoryUsage']}")
        elif args.command == "predict":
            if not args.image.is_file():
                raise ServerError(f"no such image: {args.image}")
            status, body = server.predict(args.image.read_bytes())
            print(json.dumps(body, indent=2))
            return 0 if status == 200 else 1
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
