"""Two nodes for real: torchrun with c10d rendezvous across two network namespaces joined by a veth pair.

Each "node" is a network namespace with only loopback and one end of a veth pair (10.250.0.1/30 and
10.250.0.2/30, a private range used on that link only), so rendezvous, the TCPStore and gloo's
all-reduces all cross a real network link between two network stacks, as between two machines.
Root only (creating namespaces needs CAP_NET_ADMIN); torn down after each test, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from training.data import ensure_mnist

ROOT = Path(__file__).resolve().parent.parent
ADDRESSES = ("10.250.0.1", "10.250.0.2")  # node 0 hosts the rendezvous
RDZV_PORT = 29400
# 8192 = 128 steps of a global batch of 64: divisible by world × batch, so every rank takes the same steps.
# Two epochs: after one, two runs of the same recipe can still differ by 15 points of accuracy.
SLICE = ["--epochs", "2", "--train-limit", "8192", "--val-size", "1000", "--test-limit", "2000", "--threads", "1",
         "--device", "cpu", "--amp", "false"]


def _why_no_netns() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"`ip netns` is unavailable: {probe.stderr.strip()}"


def needs_netns(test):
    """Slow, and skipped with the reason where namespaces cannot be made."""
    reason = _why_no_netns()
    return pytest.mark.slow(pytest.mark.skipif(reason is not None, reason=str(reason))(test))


@dataclass(frozen=True)
class Node:
    netns: str
    interface: str
    address: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[Node, Node]]:
    """Two namespaces, one veth pair between them, loopback up in each; deleted on exit whatever happened."""
    tag = f"mn{os.getpid() % 100000}"
    nodes = tuple(Node(f"{tag}n{i}", f"{tag}v{i}", ADDRESSES[i]) for i in range(2))
    try:
        for node in nodes:
            _ip("netns", "add", node.netns)
        _ip("link", "add", nodes[0].interface, "type", "veth", "peer", "name", nodes[1].interface)
        for node in nodes:
            _ip("link", "set", node.interface, "netns", node.netns)
            _ip("-n", node.netns, "addr", "add", f"{node.address}/30", "dev", node.interface)
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("-n", node.netns, "link", "set", node.interface, "up")
        yield nodes  # type: ignore[misc]
    finally:
        for node in nodes:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)


def torchrun_command(node_rank: int, local_addr: str, out_dir: str, extra: tuple[str, ...] = ()) -> list[str]:
    """What each machine runs (docs: Scaling out). Two flags matter beyond the obvious ones:
    `--rdzv-conf is_host=1|0` says which node serves the rendezvous store (torchrun guesses it by
    comparing the endpoint with the machine's hostname, which fails when the hostname resolves to
    another interface) and `--local-addr` is the address the other node reaches this one at (by
    default torchrun advertises the hostname, which here resolves outside the link)."""
    return ["torchrun", "--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRESSES[0]}:{RDZV_PORT}", "--rdzv-id", "mnist",
            "--rdzv-conf", f"is_host={int(node_rank == 0)}", "--local-addr", local_addr, *extra,
            "-m", "training.train", "--out-dir", out_dir, "--batch-size", "32", *SLICE]


def start_node(node: Node, rank: int, out_dir: Path, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = torchrun_command(rank, node.address, str(out_dir), extra)
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    data_dir = str(ensure_mnist().parent.parent)
    # gloo picks its interface from the hostname by default; name the veth so it uses this link.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": node.interface, "MNIST_DIR": data_dir}
    cmd += ["--data-dir", data_dir]
    return subprocess.Popen(["ip", "netns", "exec", node.netns, *cmd], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(*procs: subprocess.Popen) -> None:
    """SIGKILL each node's torchrun and its workers (they run in sessions of their own)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        proc.wait()


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@needs_netns
def test_two_namespaces_train_like_one_machine(tmp_path):
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with two_nodes() as nodes:
        procs = [start_node(n, r, tmp_path / f"node{r}", logs[r]) for r, n in enumerate(nodes)]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            stop(*procs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    out0 = logs[0].read_text()
    assert "cpu × 2 ranks; global batch 64" in out0
    # Rank 0 (on node 0: it hosts the rendezvous and joins first) alone writes; node 1 writes nothing.
    assert (tmp_path / "node0" / "model.pt").exists() and not (tmp_path / "node1").exists()

    data_dir = str(ensure_mnist().parent.parent)
    common = ["-m", "training.train", "--data-dir", data_dir, *SLICE]
    one_machine = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", *common, "--batch-size", "32", "--out-dir", str(tmp_path / "standalone")],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one_machine.returncode == 0, one_machine.stderr
    single = subprocess.run([sys.executable, *common, "--batch-size", "64", "--out-dir", str(tmp_path / "single")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr

    # Across the link, the same ranks compute bit for bit what they compute on one machine.
    two, one = weights(tmp_path / "node0" / "model.pt"), weights(tmp_path / "standalone" / "model.pt")
    assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in two)
    # And the model is as good as one process at the same global batch (augmentation draws and
    # batch-norm statistics are per rank, so the weights are not the same: test_ddp.py's check).
    acc = {name: json.loads((tmp_path / name / "metrics.json").read_text())["test_accuracy"]
           for name in ("node0", "single")}
    print(f"test accuracy: two nodes {acc['node0']:.2%}, one process at global batch 64 {acc['single']:.2%}")
    assert acc["node0"] > 0.9 and abs(acc["node0"] - acc["single"]) < 0.03, acc


@needs_netns
def test_a_node_killed_mid_epoch_ends_the_other_within_seconds(tmp_path):
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    extra = ("--max-restarts", "0")
    with two_nodes() as nodes:
        procs = [start_node(n, r, tmp_path / f"node{r}", logs[r], extra) for r, n in enumerate(nodes)]
        try:
            wait_for(logs[0], "training on", procs[0])  # killed at once: inside the run on any CPU
            node1 = psutil.Process(procs[1].pid)
            for p in [node1, *node1.children(recursive=True)]:  # node 1 dies: agent and worker at once
                p.kill()  # (the worker is in a session of its own: killing the agent's group misses it)
            killed = time.monotonic()
            code = procs[0].wait(timeout=120)
            took = time.monotonic() - killed
        finally:
            stop(*procs)
    out = logs[0].read_text(errors="replace")
    print(f"node 0 exited {code} {took:.1f} s after node 1 was killed")
    assert code != 0
    assert "ChildFailedError" in out and "training.train FAILED" in out, out[-3000:]
    assert "epoch 2/2" not in out  # it died inside the run
    assert not (tmp_path / "node0" / "model.pt").exists()


def test_readme_shows_the_command_this_test_runs():
    readme = (ROOT / "README.md").read_text()
    for rank in (0, 1):
        assert " ".join(torchrun_command(rank, ADDRESSES[rank], "artifacts/two-nodes")) in readme, rank
