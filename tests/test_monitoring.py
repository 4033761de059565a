"""configs/prometheus.yml and configs/alerts.yml: checked by promtool, unit-tested on synthetic series, and
run on a real Prometheus scraping a real TorchServe (slow).

The binaries come from Debian's `prometheus` package (`make system-deps`); the tests skip only where
it is missing, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from serving.monitor import ALERTS_YML, PROMETHEUS_YML, Prometheus, shorten_rules, write_config
from serving.server import TorchServe, free_port
from serving.worker.handler import LOW_CONFIDENCE
from training.data import load_split

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, encode_png  # noqa: E402

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make system-deps` installs "
                                                             "Debian's prometheus package")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus missing: "
                                      "`make system-deps` installs Debian's prometheus package")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_config_and_rules_pass_promtool():
    for args in (("check", "config", str(PROMETHEUS_YML)), ("check", "rules", str(ALERTS_YML)),
                 ("test", "rules", "tests/prometheus/rules_test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]]


def test_rules_follow_the_naming_and_alerting_conventions():
    for rule in rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
        else:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert "\n" not in rule["annotations"]["summary"].strip(), rule["alert"]


def test_drift_reference_is_the_training_label_distribution(mnist_dir):
    _, labels = load_split(mnist_dir, train=True)
    counts = torch.bincount(labels, minlength=10).tolist()
    shares = {r["labels"]["Digit"]: r["expr"] for r in rules()
              if r.get("record") == "digit:mnist_training_labels:share"}
    assert shares == {str(d): f"vector({c} / {len(labels)})" for d, c in enumerate(counts)}


def test_shortened_rules_change_only_windows_and_holds():
    short = shorten_rules(ALERTS_YML.read_text(), "10s", "5s")
    ranges = re.findall(r"\[(\d+[smhd])\]", short)
    assert len(ranges) == len(re.findall(r"\[(\d+[smhd])\]", ALERTS_YML.read_text())) > 0
    assert set(ranges) == {"10s"}
    assert set(re.findall(r"for: (\S+)", short)) == {"5s"}
    assert len(yaml.safe_load(short)["groups"]) == len(yaml.safe_load(ALERTS_YML.read_text())["groups"])


# --- a real Prometheus scraping a real TorchServe ---------------------------------------------------------

def wait_for(check, seconds: float):
    """Poll `check` until it returns something truthy or the time is up; return its last value."""
    deadline = time.monotonic() + seconds
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


@pytest.fixture
def monitored(trained_archive, tmp_path):
    """TorchServe and Prometheus on free loopback ports; rules with 10 s windows and 5 s holds, 1 s scrapes."""
    server = TorchServe.on_free_ports(tmp_path / "run", trained_archive.path.parent)
    server.start(timeout=120)
    prometheus = None
    try:
        (tmp_path / "prometheus").mkdir()
        config = write_config(tmp_path / "prometheus", server.addresses["metrics"], "1s",
                              shorten_rules(ALERTS_YML.read_text(), "10s", "5s"))
        prometheus = Prometheus(config, f"127.0.0.1:{free_port()}").start()
        yield server, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


@needs_prometheus
@pytest.mark.slow
def test_prometheus_counts_what_was_sent_and_fires_the_drift_alert(monitored, mnist_test_images):
    server, prometheus = monitored
    images, labels = mnist_test_images
    answers = []
    for i in range(100):
        status, body = server.predict(encode_png(images[i]), "image/png")
        assert status == 200
        answers.append(body)
    digits = Counter(str(a["digit"]) for a in answers)
    low = sum(a["confidence"] < LOW_CONFIDENCE for a in answers)

    def counted() -> tuple:
        return (by_label(prometheus.query('sum by (Digit) (MNISTPredictions{ModelName="mnist"})'), "Digit"),
                by_label(prometheus.query('sum(ts_inference_requests_total{model_name="mnist"})'), ""),
                by_label(prometheus.query("sum(mnist_low_confidence_predictions_total)"), ""))

    expected = ({d: float(n) for d, n in digits.items()}, {"": 100.0}, {"": float(low)} if low else {})
    assert wait_for(lambda: counted() == expected, 30) and counted() == expected

    # Now only 1s: the served distribution leaves the training one; the drift alert goes pending, then firing.
    ones = [encode_png(images[i]) for i in range(len(labels)) if labels[i] == 1][:50]
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            for png in ones:
                assert server.predict(png, "image/png")[1]["digit"] == 1

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    states: list[str] = []

    def drift_state() -> str | None:
        alerts = [a for a in prometheus.alerts() if a["labels"]["alertname"] == "MNISTPredictionDrift"]
        states.extend(a["state"] for a in alerts if not states or states[-1] != a["state"])
        return "firing" if any(a["state"] == "firing" for a in alerts) else None

    try:
        fired = wait_for(drift_state, 90)
    finally:
        stop.set()
        sender.join(30)
    assert fired == "firing", f"states seen: {states}"
    assert states[0] == "pending"  # held for its `for:` before firing
    (alert,) = [a for a in prometheus.alerts() if a["labels"]["alertname"] == "MNISTPredictionDrift"]
    assert (alert["labels"]["ModelVersion"], alert["labels"]["severity"]) == ("1.0", "warning")
    assert float(alert["value"]) > 0.25
    assert not [a for a in prometheus.alerts() if a["labels"]["alertname"] in ("MNISTHighErrorRate", "TorchServeDown")
                and a["state"] == "firing"]


def test_monitor_config_points_at_the_server_and_the_rules(tmp_path):
    path = write_config(tmp_path, "127.0.0.1:18082")
    config = yaml.safe_load(path.read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:18082"]
    assert config["rule_files"] == [str(tmp_path / "alerts.yml")]
    assert Path(config["rule_files"][0]).read_text() == ALERTS_YML.read_text()


def test_dashboard_plots_only_recorded_series():
    dashboard = json.loads((ROOT / "configs" / "grafana" / "mnist-dashboard.json").read_text())
    recorded = {r["record"] for r in rules() if "record" in r}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", e)}
    assert exprs and used and used <= recorded, used - recorded
