"""Versions side by side on one real TorchServe: deploy, promote, rollback, undeploy, compare, and the
zero-downtime check (bench/rollout.py) with a few seconds per step.

Version 1.0 is the briefly trained model (default variant), version 2.0 the same weights as the eager
variant (a different archive, so a different registration; deterministic whatever the batching, unlike
dynamic int8, whose activation scale depends on the batch the server happens to form), and both
answers are computed offline the way the worker computes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch

from bench.rollout import digits, run_steps
from serving import lifecycle
from serving.archive import build_archive
from serving.client import ServerClient
from serving.compare import compare, report
from serving.server import ServerError, TorchServe
from serving.signing import SignatureError, fingerprint, signing_key
from serving.store import archive_to_serve, archive_version
from serving.worker.variants import serving_model, to_model_input
from training.checkpoint import load_checkpoint, model_from_checkpoint

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, SAMPLE_7, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def server(trained_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("lifecycle")
    store = base / "store"
    build_archive(trained_checkpoint, store, "mnist", "1.0")
    ts = TorchServe.on_free_ports(base / "run", store, extra_properties={"enable_model_api": "true"})
    ts.start(timeout=120)
    try:
        # As `make archive VERSION=2.0` beside a running server: 1.0 moves to mnist-1.0.mar, 2.0 is mnist.mar.
        build_archive(trained_checkpoint, store, "mnist", "2.0", variant="eager")
        yield ts
    finally:
        assert ts.stop()


def answered_by(server: TorchServe, path: str = "/predictions/mnist") -> tuple[int, str, int]:
    """(status, X-Model-Version, digit) for the sample 7."""
    req = urllib.request.Request(server.url("inference", path), data=SAMPLE_7.read_bytes(),
                                 headers={"Content-Type": "image/png",
                                          "Authorization": f"Bearer {server.token('inference')}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.headers["X-Model-Version"], json.loads(resp.read())["digit"]


def registered(server: TorchServe) -> list[str]:
    return sorted(str(m["modelVersion"]) for m in lifecycle.registered(server))


@pytest.mark.slow
def test_only_verified_archives_of_the_store_can_be_registered(server, tmp_path):
    store = server.model_store
    # TorchServe's own allow-list (the store's file:// pattern) refuses anything else, even with the token.
    for url in ("https://example.com/mnist.mar", f"file://{tmp_path}/mnist.mar", "../mnist.mar"):
        status, raw = server.request("management", f"/models?url={url}", method="POST")
        assert status == 404, url
        assert json.loads(raw)["message"] in (f"Given URL {url} does not match any allowed URL(s)",
                                              f"Relative path is not allowed in url: {url}")
    with pytest.raises(ServerError, match=r"^no archive of mnist version 9\.0 in .*\(found: 1\.0, 2\.0\)"):
        lifecycle.deploy(server, store, "9.0")
    # An archive in the store that is not signed (or no longer matches its signature) is never registered.
    build_archive(save_tiny_checkpoint(tmp_path / "tiny.pt"), store, "mnist", "3.0")
    (store / "mnist.mar.sig").unlink()
    with pytest.raises(SignatureError, match=r"mnist\.mar is not signed \(mnist\.mar\.sig is missing\)"):
        lifecycle.deploy(server, store, "3.0")
    for leftover in ("mnist.mar", "mnist.mar.sha256"):  # the store as before: 2.0 is mnist-2.0.mar now
        (store / leftover).unlink()
    assert registered(server) == ["1.0"]


@pytest.mark.slow
def test_deploy_promote_rollback_undeploy(server):
    store = server.model_store
    with pytest.raises(ServerError, match=r"^mnist 1\.0 is already registered \(the default\): nothing to deploy"):
        lifecycle.deploy(server, store, "1")  # was TorchServe's raw 409
    message = lifecycle.deploy(server, store, "2")  # `make deploy VERSION=2`
    assert message.startswith("deployed mnist 2.0 from mnist-2.0.mar (signed by ")
    with pytest.raises(ServerError, match=r"^mnist 2\.0 is already registered \(beside the default\)"):
        lifecycle.deploy(server, store, "2.0")
    assert registered(server) == ["1.0", "2.0"]
    assert answered_by(server) == (200, "1.0", 7)
    assert answered_by(server, "/predictions/mnist/2.0") == (200, "2.0", 7)  # shadow: reachable, not default
    assert answered_by(server, "/predictions/mnist/1.0") == (200, "1.0", 7)
    # As many workers as the archive's model-config.yaml asks for, like the version loaded at start.
    _, body = server.request("management", "/models/mnist/2.0")
    workers = [w["status"] for w in json.loads(body)[0]["workers"]]
    assert workers == ["READY"] * lifecycle.archive_workers(server.model_store / "mnist-2.0.mar") == ["READY"] * 2

    assert lifecycle.promote(server, "2", store) == "mnist 2.0 is the default (was 1.0; `make rollback` returns to it)"
    assert answered_by(server) == (200, "2.0", 7)
    assert archive_to_serve(store, "mnist") == (store / "mnist-2.0.mar", "2.0")  # what a restart would serve
    table = lifecycle.versions_table(server, server.model_store)
    signer = fingerprint(signing_key().public_key())
    assert [(line[:9].strip(), line[10:18].strip()) for line in table[1:]] == [("1.0", ""), ("2.0", "*")]
    assert all(signer in line for line in table[1:])

    assert lifecycle.rollback(server, store) == "mnist 1.0 is the default again (was 2.0)"
    assert answered_by(server) == (200, "1.0", 7)
    mar, chosen = archive_to_serve(store, "mnist")  # a restart serves 1.0 again, not the newest archive
    assert (archive_version(mar), chosen) == ("1.0", "1.0")
    with pytest.raises(ServerError, match="nothing to roll back to"):
        lifecycle.rollback(server)
    with pytest.raises(ServerError, match=r"^1\.0 is the default: promote or roll back to another version first$"):
        lifecycle.undeploy(server, "1.0")

    env = {**os.environ, "SERVE_DIR": str(server.run_dir), **{f"{k.upper()}_ADDRESS": v
                                                                for k, v in server.addresses.items()}}
    out = subprocess.run([sys.executable, "-m", "serving.lifecycle", "--model-store", str(server.model_store),
                          "versions"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["1.0", "*"]  # default again, after the rollback
    assert lifecycle.undeploy(server, "2.0") == "unregistered mnist 2.0"
    assert registered(server) == ["1.0"]


@pytest.mark.slow
def test_compare_sends_the_test_set_to_both_versions(server, trained_checkpoint, mnist_test_images):
    lifecycle.deploy(server, server.model_store, "2.0")
    try:
        result = compare(server, "1.0", "2.0", limit=300)
    finally:
        lifecycle.undeploy(server, "2.0")
    images, labels = mnist_test_images
    with torch.inference_mode():
        for version, variant in (("1.0", "fused"), ("2.0", "eager")):
            offline = serving_model(model_from_checkpoint(load_checkpoint(trained_checkpoint)), variant)
            expected = offline(to_model_input(images[:300])).argmax(1).tolist()
            assert result.answers[version] == expected, version
    assert result.labels == labels[:300].tolist()
    assert result.errors == {"1.0": {}, "2.0": {}}
    lines = report(result, "mnist")
    diff = result.disagreements()
    assert lines[0] == "mnist 1.0 vs 2.0 on 300 MNIST test digits, over HTTP"
    assert lines[4] == f"agreement {1 - len(diff) / 300:.2%} ({300 - len(diff)} of 300)"


@pytest.mark.slow
def test_rollout_under_load_drops_no_request(server, mnist_dir):
    pngs, labels = digits(200, str(mnist_dir))
    steps = run_steps(server, "1.0", "2.0", step_seconds=2, threads=32, pngs=pngs, labels=labels)
    assert [s.name for s in steps] == ["warm-up", "steady", "deploy", "promote", "rollback", "undeploy"]
    assert {s.name: [(r.status, r.detail) for r in s.failures] for s in steps} == {s.name: [] for s in steps}
    assert all(s.records for s in steps)
    assert {v for s in steps for v in s.versions} == {"1.0", "2.0"}  # every answer names one of the two
    assert set(steps[1].versions) == {"1.0"}  # steady: the default alone
    assert "2.0" in steps[3].versions  # promote: the new default answers
    assert set(steps[5].versions) == {"1.0"}  # after the rollback and undeploy: 1.0 alone
    assert registered(server) == ["1.0"]


def test_promotes_of_an_earlier_run_of_the_server_are_forgotten(tmp_path):
    client = ServerClient(run_dir=tmp_path)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / ".model_server.pid").write_text("4242\n")
    lifecycle._save_history(client, ["1.0"])
    assert lifecycle._history(client) == ["1.0"]
    (tmp_path / "tmp" / ".model_server.pid").write_text("4343\n")  # restarted: it serves one version again
    assert lifecycle._history(client) == []


HISTORY_WRITER = """
import sys
from pathlib import Path
from serving import lifecycle
from serving.client import ServerClient
client = ServerClient(run_dir=Path(sys.argv[1]))
for i in range(25):
    with lifecycle.promote_history(client) as history:
        history.append(f"{sys.argv[2]}-{i}")
"""


def test_concurrent_promotes_lose_no_record(tmp_path):
    """Four processes and four threads, 25 promotes each, all at once (two terminals, a script): each
    read-modify-write of lifecycle.json holds its lock, so no record is lost and no reader sees a torn file."""
    client = ServerClient(run_dir=tmp_path)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / ".model_server.pid").write_text("4242\n")
    processes = [subprocess.Popen([sys.executable, "-c", HISTORY_WRITER, str(tmp_path), f"p{n}"], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for n in range(4)]

    def promotes(name: str) -> None:
        for i in range(25):
            with lifecycle.promote_history(client) as history:
                history.append(f"{name}-{i}")

    threads = [threading.Thread(target=promotes, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.communicate(timeout=120)[1] for p in processes] == [""] * 4
    history = lifecycle._history(client)
    assert sorted(history) == sorted(f"{who}{n}-{i}" for who in "pt" for n in range(4) for i in range(25))
    for who in [f"p{n}" for n in range(4)] + [f"t{n}" for n in range(4)]:  # each writer's records in its order
        assert [r for r in history if r.startswith(who + "-")] == [f"{who}-{i}" for i in range(25)]


@pytest.mark.parametrize("text", ['{"server_start": "4242", "defaults": ["1.', "", "[]", '{"defaults": "1.0"}'])
def test_a_torn_history_is_a_one_line_error(tmp_path, text):
    (tmp_path / "lifecycle.json").write_text(text)
    env = {**os.environ, "SERVE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "serving.lifecycle", "rollback"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"error: {tmp_path / 'lifecycle.json'} is not a promote history (")
    assert out.stderr.endswith("): delete it to start a new one (`make rollback` then has nothing to go back to)\n")
