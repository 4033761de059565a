"""A rollout loses nothing: SIGTERM under load with and without the preStop drain (serving/drain.py).

TorchServe runs on a KServe bundle as the runtime runs it. Eight keep-alive clients stand in for the
Service's traffic; a "load balancer" routes them to the pod while its readiness probe (`drain.ready`,
polled every 0.5 s, as a readinessProbe with periodSeconds 1 would) passes, and stops routing
`PROPAGATION` seconds after it fails, the time endpoint removal takes to reach the nodes.
Printed figures go to RELIABILITY.md; `pytest tests/test_drain.py -s` shows them.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from serving import drain
from serving.kserve import build_bundle, start_local
from serving.ports import free_port

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import SAMPLE_7  # noqa: E402

pytestmark = pytest.mark.slow
CLIENTS = 8
PROPAGATION = 2.0


@dataclass
class Traffic:
    """Keep-alive clients sending a digit while the pod is in rotation; outcomes counted."""
    url: str
    in_rotation: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    ok_after_drain_began: int = 0
    draining: bool = False

    def client(self) -> None:
        host, port = self.url.split("://")[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = SAMPLE_7.read_bytes()
        while not self.done.is_set():
            if not self.in_rotation.is_set():
                time.sleep(0.01)
                continue
            with self.lock:
                self.in_flight += 1
            try:
                conn.request("POST", "/predictions/mnist", body, {"Content-Type": "image/png"})
                resp = conn.getresponse()
                answer = resp.read()
                outcome = None if resp.status == 200 and b'"digit"' in answer else f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as err:
                outcome = type(err).__name__
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            with self.lock:
                self.in_flight -= 1
                if outcome is None:
                    self.ok += 1
                    self.ok_after_drain_began += self.draining
                else:
                    self.failed.append(outcome)
        conn.close()


def balancer(traffic: Traffic, management: str, marker: Path) -> None:
    """Route to the pod while its readiness passes; stop PROPAGATION s after it fails. As Kubernetes'
    failureThreshold (3) does, a probe TorchServe is too busy to answer in time fails only thrice in a row."""
    unanswered = 0
    while not traffic.done.is_set():
        try:
            reason, unanswered = drain.not_ready_reason(management, marker), 0
        except drain.DrainError as err:
            unanswered += 1
            reason = str(err) if unanswered >= 3 else None
        if reason is not None:
            time.sleep(PROPAGATION)
            traffic.in_rotation.clear()
            return
        time.sleep(0.5)


def sigterm_under_load(bundle: Path, run_dir: Path, with_drain: bool) -> dict:
    server = start_local(bundle, run_dir)
    marker = run_dir / "draining"
    traffic = Traffic(server.url("inference"))
    traffic.in_rotation.set()
    threads = [threading.Thread(target=traffic.client) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=balancer, args=(traffic, server.url("management"), marker)))
    for t in threads:
        t.start()
    try:
        time.sleep(3)  # steady load
        traffic.draining = True
        if with_drain:  # what the preStop hook runs, then the kubelet's SIGTERM
            drain.drain(server.url("management"), server.url("metrics"), marker, settle=4, quiet=1, timeout=30)
        in_flight_at_sigterm = traffic.in_flight
        server.stop()  # SIGTERM to the frontend, as the kubelet sends it
        time.sleep(1)
    finally:
        traffic.done.set()
        for t in threads:
            t.join(timeout=60)
        server.stop()
    result = {"ok": traffic.ok, "ok_after_drain_began": traffic.ok_after_drain_began,
              "in_flight_at_sigterm": in_flight_at_sigterm, "failed": len(traffic.failed),
              "failures": dict(Counter(traffic.failed))}
    print(f"{'with' if with_drain else 'without'} drain: {result}")
    return result


@pytest.fixture(scope="module")
def bundle(tiny_archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drain") / "bundle"
    build_bundle(tiny_archive[1].path.parent, "mnist", out)
    return out


def test_prestop_drain_loses_no_request(bundle, tmp_path):
    result = sigterm_under_load(bundle, tmp_path, with_drain=True)
    assert result["failed"] == 0, result
    assert result["in_flight_at_sigterm"] == 0
    # Not vacuous: the pod kept answering after readiness failed, until the balancer moved away.
    assert result["ok_after_drain_began"] > 0


def test_sigterm_without_drain_is_what_the_drain_prevents(bundle, tmp_path):
    """The baseline, measured rather than assumed: clients still routed to the pod at SIGTERM."""
    result = sigterm_under_load(bundle, tmp_path, with_drain=False)
    assert result["ok"] > 0 and result["failed"] > 0, result


def test_a_torchserve_that_does_not_answer_is_waited_for_not_an_error(tmp_path):
    """The preStop hook asks TorchServe for its load; a busy pod may not answer in time. That is not a
    reason to give up early (SIGTERM would cut what is in flight): it asks again until its timeout."""
    with socket.socket() as silent:  # listens, never answers: the connection waits in the backlog
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        said: list[str] = []
        waited = drain.drain(url, url, tmp_path / "draining", settle=0, quiet=0.2, timeout=1, say=said.append)
    assert waited >= 1
    assert (tmp_path / "draining").exists()
    assert [line.split(":")[0] + ": " + line.rsplit("; ", 1)[-1] for line in said[1:-1]] == ["drain: asking again"]
    assert said[-1] == "drain: not idle after 1 s (requests still arriving, or no answer): giving up, SIGTERM follows"


def test_a_torchserve_that_is_not_running_has_nothing_to_drain(tmp_path):
    """Connection refused: nothing listens, so nothing is in flight; the hook ends at once."""
    nothing = f"http://127.0.0.1:{free_port()}"
    said: list[str] = []
    waited = drain.drain(nothing, nothing, tmp_path / "draining", settle=0, quiet=0.2, timeout=30, say=said.append)
    assert waited < 10
    assert said[-1].endswith("TorchServe is not running, nothing to drain"), said
