"""Start, watch and stop TorchServe over model_store/: the lifecycle behind `make serve` and `make stop`.

Each server gets a run directory (env SERVE_DIR, default `logs/`) holding its effective
config.properties, its token file (key_file.json), its logs and its pid file. TorchServe keeps its
pid file in $TMPDIR and its token file in the working directory, so pointing both at the run
directory lets several servers (a user's and a test's) coexist and stop cleanly. The run directory
is its owner's alone (0700), and TorchServe runs under umask 077.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from serving.client import ROOT, ServerClient
from serving.errors import ServerError
from serving.java import check_java
from serving.ports import DEFAULT_ADDRESSES, DEFAULT_GRPC_PORTS, free_port, free_ports, host_port, port_is_free
from serving.signing import verified_copy, verify_archive
from serving.store import archive_to_serve
from training.data import sha256_of

__all__ = ["ServerError", "TorchServe", "free_port", "port_is_free", "verify_checksum"]

TEMPLATE = ROOT / "configs" / "config.properties"
LOG4J = ROOT / "configs" / "log4j2.xml"  # each log line in one rotated file (docs: Serving, Tuning)


@dataclass
class TorchServe(ServerClient):
    model_store: Path = ROOT / "model_store"
    grpc_ports: dict[str, int] = field(default_factory=lambda: {
        k: int(os.environ.get(k.upper(), v)) for k, v in DEFAULT_GRPC_PORTS.items()})
    extra_properties: dict[str, str] = field(default_factory=dict)
    log_config: Path | None = LOG4J  # None: the log4j2.xml inside TorchServe's jar (bench.profile compares)
    # Where ts_log.log ended when this start began: a crash loop is counted from there, not over the
    # whole log, which survives restarts.
    # Where each log file ended when this start began: only what a start wrote is read back.
    _log_offsets: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def on_free_ports(cls, run_dir: Path, model_store: Path, **kwargs: Any) -> TorchServe:
        """A server on free loopback ports: for tests and benchmarks beside any other TorchServe."""
        ports = iter(free_ports(len(DEFAULT_ADDRESSES) + len(DEFAULT_GRPC_PORTS)))
        return cls(run_dir=run_dir, model_store=model_store,
                   addresses={k: f"http://127.0.0.1:{next(ports)}" for k in DEFAULT_ADDRESSES},
                   grpc_ports={k: next(ports) for k in DEFAULT_GRPC_PORTS}, **kwargs)

    @property
    def served_store(self) -> Path:
        """What TorchServe loads from: verified copies of the store's archives, in the private run directory."""
        return self.run_dir / "store"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    def write_properties(self) -> Path:
        """The template with this server's addresses, store, URL allow-list and auth applied."""
        store = self.served_store.resolve()
        props = {
            "inference_address": self.addresses["inference"],
            "management_address": self.addresses["management"],
            "metrics_address": self.addresses["metrics"],
            "model_store": str(store),
            # A regex: re.escape's escapes (a backslash before a non-letter) mean the same in Java's.
            "allowed_urls": f"file://{re.escape(str(store))}/.*\\.mar",
            "metrics_config": str(ROOT / "configs" / "metrics.yaml"),
            "disable_token_authorization": "false" if self.auth else "true",
            **{k: str(v) for k, v in self.grpc_ports.items()},
            # The worker's unix socket lives in java.io.tmpdir (/tmp/.ts.sock.9000 by default) and a new
            # worker deletes an existing one: per-run, so two servers never share or remove each other's.
            "vmargs": f"{template_value('vmargs')} -Djava.io.tmpdir={self.run_dir.resolve() / 'tmp'}"
                      + (f" -Dlog4j.configurationFile={self.log_config}" if self.log_config else ""),
            # TorchServe's default system-metrics command passes the GPU count, and with a GPU it imports
            # nvgpu/pynvml (not installed: nvgpu is unmaintained) and fails every minute, taking the CPU and
            # memory gauges with it. The same collector with --gpu 0 keeps those; GPU load is nvidia-smi's job.
            # The frontend runs this with its own Python: the script and its arguments only.
            "system_metrics_cmd": f"{_metric_collector()} --gpu 0",
            **self.extra_properties,
        }
        path = self.run_dir / "config.properties"
        path.write_text(render_properties(TEMPLATE.read_text(), props))
        return path

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            return pid if "org.pytorch.serve.ModelServer" in psutil.Process(pid).cmdline() else None
        except (OSError, ValueError, psutil.Error):
            return None

    def check_can_start(self) -> Path:
        """Everything that can be refused before a process starts; returns the archive to serve."""
        mar, _ = archive_to_serve(self.model_store, self.model_name)  # <name>.mar, or the last promoted version
        verify_checksum(mar)
        verify_archive(mar)  # the checksum catches corruption; only the signature catches tampering
        if (pid := self.running_pid()) is not None:
            raise ServerError(f"TorchServe is already running from {self.run_dir} (pid {pid}): `make stop` first")
        for kind, url in self.addresses.items():
            host, port = host_port(url)
            if not port_is_free(host, port):
                raise ServerError(f"{kind} address {host}:{port} is in use: stop what uses it or set "
                                  f"{kind.upper()}_ADDRESS")
        for key, port in self.grpc_ports.items():
            if not port_is_free("127.0.0.1", port):
                raise ServerError(f"gRPC port {port} is in use (another TorchServe?): stop it or set {key.upper()}")
        if not torchserve_bin().is_file():
            raise ServerError(f"no torchserve next to {sys.executable}: run `make setup`")
        check_java()  # last: the checks above need neither Java nor a network
        return mar

    def start(self, timeout: float = 120) -> Path:
        """Start TorchServe and wait until the model's workers are READY; returns the archive it serves."""
        mar = self.check_can_start()
        make_private_dir(self.run_dir)
        (self.run_dir / "tmp").mkdir(exist_ok=True)
        store = self.served_store
        if store.is_dir():
            shutil.rmtree(store)  # copies of a previous run's archives: only what is verified now serves
        store.mkdir(mode=0o700)
        copy_verified(mar, store)
        self.pid_file.unlink(missing_ok=True)  # stale: its process is gone (checked above)
        (self.run_dir / "key_file.json").unlink(missing_ok=True)
        self.mark_log_start()
        config = self.write_properties()
        env = {**os.environ, "TMPDIR": str(self.run_dir / "tmp"), "LOG_LOCATION": str(self.run_dir),
               "METRICS_LOCATION": str(self.run_dir),
               # Hand the handler raw bytes: it parses JSON itself, so one code path sees every input.
               "TS_DECODE_INPUT_REQUEST": "false"}
        cmd = [str(torchserve_bin()), "--start", "--ncs", "--model-store", str(store.resolve()),
               "--models", f"{self.model_name}={mar.name}", "--ts-config", str(config)]
        try:
            with (self.run_dir / "console.log").open("ab") as console:
                # umask 077: TorchServe creates key_file.json with the umask and chmods it to 0600 only
                # afterwards; in between, anyone who can reach the file could open it and keep reading.
                subprocess.run(cmd, cwd=self.run_dir, env=env, stdout=console, stderr=subprocess.STDOUT,
                               start_new_session=True, check=True, timeout=60, umask=0o077)
        except (OSError, subprocess.SubprocessError) as err:  # CalledProcessError, TimeoutExpired
            raise ServerError(f"`torchserve --start` failed ({err}); see {self.run_dir}/console.log:\n"
                              + self.log_tail("console.log")) from None
        self.wait_until_ready(timeout)
        return mar

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
            if (refused := self.self_check_refusal()) is not None:
                self.stop()
                raise ServerError(f"the model's workers refuse to serve it: {refused}")
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

    def mark_log_start(self) -> None:
        for name in ("ts_log.log", "model_log.log"):
            log = self.run_dir / name
            self._log_offsets[name] = log.stat().st_size if log.exists() else 0

    def _log_since_start(self, name: str) -> bytes:
        log = self.run_dir / name
        if not log.exists():
            return b""
        with log.open("rb") as f:
            f.seek(self._log_offsets.get(name, 0))
            return f.read()

    def self_check_refusal(self) -> str | None:
        """The worker's one line when an approximate variant failed its load-time self-check (worker/handler.py)."""
        marker = "SelfCheckError: "
        text = self._log_since_start("model_log.log").decode(errors="replace")
        line = next((line for line in text.splitlines() if marker in line), None)
        return None if line is None else line.split(marker, 1)[1].strip()

    def failed_worker_loads(self) -> int:
        """How often a worker failed to load the model since this start began."""
        return self._log_since_start("ts_log.log").count(b"Load model failed")

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
        frontend.terminate()  # the frontend stops its own workers on SIGTERM
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


def torchserve_bin() -> Path:
    return Path(sys.executable).parent / "torchserve"


def make_private_dir(path: Path) -> None:
    """Create `path` with mode 0700, or set it: the run directory holds the tokens and the logs. One that
    belongs to another user keeps its mode (a volume mounted into a container that runs as another uid,
    with group access, as docker/Dockerfile sets up): only its owner may change it, and TorchServe's
    umask 077 still keeps the key file private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_mode & stat.S_ISVTX:  # a shared directory like /tmp: 0700 would lock every other user out
            raise ServerError(f"{path} is a shared directory (sticky bit, like /tmp): set SERVE_DIR to a "
                              "directory for this server alone")
        if info.st_uid == os.geteuid():
            path.chmod(0o700)  # one made before, by an older version or by hand
    except OSError as err:
        raise ServerError(f"cannot make the run directory {path} ({err.strerror}): set SERVE_DIR to a "
                          "directory of your own") from None


def properties_value(value: str) -> str:
    """`value` written so that java.util.Properties reads it back unchanged: a backslash starts an escape
    there (`\\.` reads as `.`, which drops a regex escape), so it is doubled, and a line break would end it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def render_properties(template: str, values: dict[str, str]) -> str:
    """`template` with each `key=value` line replaced by `values[key]`, and the remaining keys appended.
    `values` are the values themselves; they are written escaped for java.util.Properties."""
    lines, seen = [], set()
    for line in template.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in values:
            line = f"{key}={properties_value(values[key])}"
            seen.add(key)
        lines.append(line)
    lines += [f"{k}={properties_value(v)}" for k, v in values.items() if k not in seen]
    return "\n".join(lines) + "\n"


def _metric_collector() -> Path:
    import ts

    return Path(ts.__file__).resolve().parent / "metrics" / "metric_collector.py"


def template_value(key: str) -> str:
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    return ""


def copy_verified(mar: Path, folder: Path) -> str:
    """Copy `mar` into the private `folder` TorchServe loads from, checking the copied bytes: the same
    checksum and signature checks as `check_can_start`, on exactly what will be served. Returns the signer."""
    expected = recorded_sha256(mar)
    copied = verified_copy(mar, folder)  # reads the archive once: the signature and the digest are of those bytes
    if copied.sha256 != expected:
        (folder / mar.name).unlink(missing_ok=True)
        raise ServerError(checksum_mismatch(mar, expected))
    return copied.signer


def verify_checksum(mar: Path) -> None:
    """Refuse an archive whose bytes differ from what `make archive` recorded beside it (corruption,
    not tampering: whoever can write the archive can write its checksum)."""
    expected = recorded_sha256(mar)
    if sha256_of(mar) != expected:
        raise ServerError(checksum_mismatch(mar, expected))


def recorded_sha256(mar: Path) -> str:
    """The digest `make archive` wrote beside the archive (<name>.mar.sha256)."""
    recorded = mar.with_name(mar.name + ".sha256")
    if not recorded.exists():
        raise ServerError(f"{recorded} is missing: rebuild the archive with `make archive`")
    return recorded.read_text().split()[0]


def checksum_mismatch(mar: Path, expected: str) -> str:
    return (f"{mar} does not match the SHA-256 recorded by `make archive` ({expected[:12]}…): "
            "it was modified or corrupted; rebuild it with `make archive ARGS=--force`")

