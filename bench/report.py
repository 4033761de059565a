"""Tables, plots and machine facts for the benchmark and fault reports."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.load import Record
from bench.record import cpu_model
from serving.server import TorchServe


def machine_line() -> str:
    """One line naming the machine a table was measured on: CPU model, cores, native bf16, load."""
    from training.core.precision import mkldnn_bf16_supported

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores, native bf16: "
            f"{'yes' if mkldnn_bf16_supported() else 'no'}; load average {load}")


def serving_table(rows: list[dict]) -> str:
    """`vs in-process`: served req/s over what the same variant does in-process at batch 32 on the
    worker's threads (the ceiling a server could reach); `vs baseline`: over TorchServe's example setup."""
    base = {r["concurrency"]: r for r in rows if r["setup"] == "baseline"}
    lines = ["| setup | conc. | req/s | p50 ms | p90 ms | p99 ms | errors | wrong answers | vs in-process "
             "| vs baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["concurrency"])
        ratio = f"{r['rps'] / b['rps']:.1f}x" if b and r["setup"] != "baseline" and b["rps"] else ""
        ceiling = r.get("in_process_rps")
        share = f"{r['rps'] / ceiling:.0%}" if ceiling else ""
        lines.append(f"| {r['setup']} | {r['concurrency']} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p90']:.1f} | "
                     f"{r['p99']:.1f} | {r['non2xx'] + r['socket_errors']} | {r['wrong']}/{r['checked']} "
                     f"| {share} | {ratio} |")
    return "\n".join(lines)


def plot_serving(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for setup in dict.fromkeys(r["setup"] for r in rows):
        pts = [r for r in rows if r["setup"] == setup]
        left.plot([r["concurrency"] for r in pts], [r["rps"] for r in pts], "o-", label=setup)
        right.plot([r["concurrency"] for r in pts], [r["p99"] for r in pts], "o-", label=setup)
    for ax, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms)")):
        ax.set(xscale="log", yscale="log", xlabel="concurrent connections", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def outcome_table(records: list[Record], hung_after: float) -> list[str]:
    ok = sum(r.status == 200 for r in records)
    hung = sum(r.seconds > hung_after for r in records)
    slowest = max((r.seconds for r in records), default=0.0)
    lines = [f"| requests | ok | failed | hung (> {hung_after:.0f} s) | wrong answers | slowest |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {len(records)} | {ok} | {len(records) - ok} | {hung} | {sum(r.wrong for r in records)} | "
             f"{slowest:.2f} s |"]
    failures = Counter((str(r.status), r.detail) for r in records if r.status != 200)
    if failures:
        lines += ["", "| failed requests | status | body (or client error) |", "|---:|---|---|"]
        lines += [f"| {n} | {status} | `{detail}` |" for (status, detail), n in failures.most_common()]
    return lines


def ok_between(records: list[Record], start: float, end: float) -> int:
    return sum(r.status == 200 and start <= r.end < end for r in records)


def worker_rss(server: TorchServe) -> dict[int, float]:
    """Each worker's RSS in MB, by pid (the frontend's child processes)."""
    frontend = psutil.Process(server.running_pid())
    return {p.pid: p.memory_info().rss / 2**20 for p in frontend.children(recursive=True)}


def rss_mb(server: TorchServe) -> dict[str, float]:
    frontend = psutil.Process(server.running_pid())
    return {"frontend": frontend.memory_info().rss / 2**20,
            **{f"worker {pid}": mb for pid, mb in worker_rss(server).items()}}


def other_jobs(seconds: float = 1.0) -> str:
    """The busiest other processes: on a shared machine they explain slow or noisy numbers."""
    processes = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()]
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent()  # starts the measurement
    time.sleep(seconds)
    busy = []
    for p in processes:
        try:
            cpu = p.cpu_percent()
        except psutil.Error:
            continue
        if cpu >= 10:
            busy.append((cpu, " ".join((p.info["cmdline"] or [p.name()])[:4])[:70]))
    return ", ".join(f"`{name}` ({cpu:.0f}% CPU)" for cpu, name in sorted(busy, reverse=True)[:4]) or "none"

