"""Prometheus beside TorchServe, on loopback: `make monitor`, `python -m serving.monitor`.

Runs the `prometheus` binary (Debian's package: `make system-deps`) as a process of its own, never a
system service: the config is configs/prometheus.yml with the scrape target set to this server's
METRICS_ADDRESS and configs/alerts.yml as its rules; the data goes to a temporary directory (a
monitor for a session, not an archive of metrics). `--fast` shortens every rate window and `for:`
(the tests use it to see alerts fire in seconds).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serving.client import ROOT
from serving.errors import ServerError
from serving.ports import address_from_env, host_port, normalize_address
from training.cli import ArgumentParser

PROMETHEUS_YML = ROOT / "configs" / "prometheus.yml"
ALERTS_YML = ROOT / "configs" / "alerts.yml"


def prometheus_bin() -> Path:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        raise ServerError("no prometheus binary: install it with `make system-deps` (Debian package prometheus)")
    return Path(found)


def shorten_rules(text: str, window: str, hold: str) -> str:
    """The same rules with every range selector `[..]` set to `window` and every `for:` to `hold`."""
    text = re.sub(r"\[\d+[smhd]\]", f"[{window}]", text)
    return re.sub(r"(?m)^(\s*for:\s*)\S+", rf"\g<1>{hold}", text)


def write_config(out_dir: Path, metrics_address: str, interval: str | None = None,
                 rules: str | None = None) -> Path:
    """configs/prometheus.yml for this server: its metrics address, absolute rules, optional interval."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    host, port = host_port(normalize_address(metrics_address, "metrics"))
    host = f"[{host}]" if ":" in host else host
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"{host}:{port}"]
    rules_file = out_dir / "alerts.yml"
    rules_file.write_text(ALERTS_YML.read_text() if rules is None else rules)
    config["rule_files"] = [str(rules_file)]
    if interval:
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Prometheus:
    config: Path
    listen: str = "127.0.0.1:9090"
    storage: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mnist-prometheus-")))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def start(self, timeout: float = 60) -> Prometheus:
        log = (self.config.parent / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [str(prometheus_bin()), f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
             f"--web.listen-address={self.listen}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"prometheus exited ({self.process.returncode}); see {self.config.parent}/"
                                  "prometheus.log")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise ServerError(f"prometheus not ready on {self.listen} after {timeout:.0f}s")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.loads(resp.read())
        if answer.get("status") != "success":
            raise ServerError(f"prometheus {path}: {answer}")
        return answer["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's vector: [{"metric": {...labels}, "value": [time, "value"]}]."""
        return self.api("query", query=promql)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.storage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9090", help="Prometheus web address (keep it on loopback)")
    parser.add_argument("--run-dir", default=ROOT / "logs" / "prometheus", type=Path)
    parser.add_argument("--fast", action="store_true", help="1 s scrapes, 30 s windows, 10 s `for:` (demos, tests)")
    args = parser.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    rules = shorten_rules(ALERTS_YML.read_text(), "30s", "10s") if args.fast else None
    config = write_config(args.run_dir, address_from_env("metrics"), "1s" if args.fast else None, rules)
    try:
        prometheus = Prometheus(config, args.listen).start()
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Prometheus on {prometheus.url} scraping {address_from_env('metrics')} with {config}; "
          f"alerts: {prometheus.url}/alerts. Ctrl-C stops it.")
    stopping: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    assert prometheus.process is not None  # started above
    while not stopping and prometheus.process.poll() is None:
        time.sleep(0.5)
    prometheus.stop()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
