"""Readiness and drain for TorchServe in a pod: `python -m serving.drain ready | prestop`.

TorchServe 0.12 has no graceful shutdown: SIGTERM closes the frontend's sockets at once, and the
requests in flight fail (RELIABILITY.md, "Rolling out without losing requests"). So a rollout drains
before the signal: the pod's preStop hook runs `prestop`, which marks the pod draining (its readiness
probe, `ready`, fails from then on, so Kubernetes takes it out of the Service's endpoints), keeps
serving while the endpoint removal reaches every node (`--settle`), then waits until no request has
arrived for `--quiet` seconds and TorchServe's queue is empty. Only then does the kubelet send SIGTERM.

Standard library only: it runs inside KServe's TorchServe runtime image (deploy/kserve/torchserve.Dockerfile).
Addresses come from the bundle's config.properties (the management API answers readiness).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CONFIG = "/mnt/models/config/config.properties"
MARKER = "/tmp/mnist-draining"  # on the container's own filesystem: gone when the pod is replaced


class DrainError(RuntimeError):
    """TorchServe cannot be asked about its workers or its load."""


class NotRunning(DrainError):
    """Nothing listens at TorchServe's address (connection refused): nothing to drain."""


def addresses(config: Path) -> tuple[str, str]:
    """(management URL, metrics URL) from a TorchServe config.properties; 0.0.0.0 is reached on loopback."""
    props = dict(line.split("=", 1) for line in config.read_text().splitlines()
                 if "=" in line and not line.lstrip().startswith("#"))
    management, metrics = (props[k].strip().replace("0.0.0.0", "127.0.0.1")
                           for k in ("management_address", "metrics_address"))
    return management, metrics


def _get(url: str, timeout: float = 2) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        kind = NotRunning if isinstance(reason, ConnectionRefusedError) else DrainError
        raise kind(f"cannot reach {url}: {reason}") from None


def models(management: str) -> list[dict]:
    """Every registered model (its default version), described: workers, queue."""
    names = [m["modelName"] for m in json.loads(_get(f"{management}/models"))["models"]]
    return [version for name in names for version in json.loads(_get(f"{management}/models/{name}"))]


def not_ready_reason(management: str, marker: Path) -> str | None:
    """Why this pod must not get traffic, or None. `/ping` is not enough: it says Healthy while
    workers crash in a loop; every worker of every model must be READY."""
    if marker.exists():
        return "draining"
    described = models(management)
    if not described:
        return "no model registered"
    for model in described:
        states = [w["status"] for w in model.get("workers", [])]
        if not states or any(s != "READY" for s in states):
            return f"model {model['modelName']} workers {states}"
    return None


def parse_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text → {(name, {(label, value)}): value}: the project's one parser of it (serving/lifecycle.py
    reads the versions' counters with it too)."""
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line):
            found[(match[1], frozenset(re.findall(r'(\w+)="([^"]*)"', match[2] or "")))] = float(match[3])
    return found


def requests_received(metrics: str) -> float:
    """TorchServe's count of inference requests received (all models), from its Prometheus metrics."""
    text = _get(f"{metrics}/metrics").decode(errors="replace")
    return sum(v for (name, _), v in parse_samples(text).items() if name == "ts_inference_requests_total")


def pending(management: str) -> int:
    return sum(m.get("jobQueueStatus", {}).get("pendingRequests", 0) for m in models(management))


def drain(management: str, metrics: str, marker: Path, settle: float, quiet: float, timeout: float,
          say=print) -> float:
    """Mark draining, keep serving `settle` s, then wait until idle for `quiet` s; return the idle wait.
    A question TorchServe does not answer in time, or answers with something unreadable (a busy pod),
    counts as not idle yet, not as an error: giving up early would let SIGTERM cut the requests in
    flight. Where nothing listens any more (connection refused), nothing is in flight: it returns at once."""
    marker.touch()
    say(f"drain: readiness now fails; serving on for {settle:.0f} s while endpoints update")
    time.sleep(settle)
    start, unanswered = time.monotonic(), False

    def load() -> tuple[float, int] | None:
        nonlocal unanswered
        try:
            answer, unanswered = (requests_received(metrics), pending(management)), False
            return answer
        except NotRunning:
            raise
        except (DrainError, ValueError, KeyError, TypeError) as err:  # ValueError: a body that is not JSON
            if not unanswered:
                say(f"drain: {err}; asking again")
            unanswered = True
            return None

    try:
        last, idle_since = load(), time.monotonic()
        while time.monotonic() - start < timeout:
            time.sleep(0.2)
            now = load()
            if now is None or last is None or now[0] != last[0] or now[1]:
                last, idle_since = now, time.monotonic()
            elif time.monotonic() - idle_since >= quiet:
                say(f"drain: idle for {quiet:.1f} s after {time.monotonic() - start:.1f} s: ready for SIGTERM")
                return time.monotonic() - start
    except NotRunning as err:
        say(f"drain: {err}: TorchServe is not running, nothing to drain")
        return time.monotonic() - start
    say(f"drain: not idle after {timeout:.0f} s (requests still arriving, or no answer): giving up, SIGTERM follows")
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG, type=Path, help=f"TorchServe config.properties (default {CONFIG})")
    parser.add_argument("--marker", default=MARKER, type=Path)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ready", help="exit 0 only if not draining and every worker is READY (readinessProbe)")
    prestop = sub.add_parser("prestop", help="fail readiness, keep serving, wait until idle (preStop hook)")
    prestop.add_argument("--settle", type=float, default=10, help="seconds to serve on while endpoints update")
    prestop.add_argument("--quiet", type=float, default=1, help="seconds without a new request that mean idle")
    prestop.add_argument("--timeout", type=float, default=30, help="give up waiting for idle after this")
    args = parser.parse_args(argv)
    try:
        management, metrics = addresses(args.config)
        if args.command == "ready":
            reason = not_ready_reason(management, args.marker)
            print("ready" if reason is None else f"not ready: {reason}")
            return 0 if reason is None else 1
        drain(management, metrics, args.marker, args.settle, args.quiet, args.timeout)
    except (DrainError, OSError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
