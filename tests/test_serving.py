"""End to end: a briefly trained model, archived, served by a real TorchServe on free loopback ports.

One server for the module (about 5 s to start); its teardown stops it and checks that the frontend
and its Python worker are gone. The tests at the top need no running server.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

import psutil
import pytest
import yaml

from bench.inputs import handler_rejections
from serving.drain import parse_samples
from serving.ports import free_ports
from serving.server import ServerError, TorchServe, make_private_dir

# Shared fixtures (tiny_archive, trained_archive, trained_checkpoint) load as a plugin, so each
# exists once per session; helpers are imported by name, after registering for assert rewriting.
pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, SAMPLE_7, encode_png, offline_probabilities, settled  # noqa: E402

MAX_REQUEST_SIZE = 1048576  # configs/config.properties
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def loopback_addresses() -> dict[str, str]:
    ports = iter(free_ports(3))
    return {kind: f"http://127.0.0.1:{next(ports)}" for kind in ("inference", "management", "metrics")}


def call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """A plain HTTP call: no token added, status/body/headers returned whatever the status."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def predict(server: TorchServe, body: bytes, content_type: str) -> tuple[int, dict, str]:
    """POST /predictions/mnist with the inference key: (status, JSON body, x-request-id)."""
    status, raw, headers = call(server.url("inference", "/predictions/mnist"), body,
                                {"Content-Type": content_type,
                                 "Authorization": f"Bearer {server.token('inference')}"})
    return status, json.loads(raw) if raw else {}, headers.get("x-request-id", "")


def multipart(field: str, png: bytes) -> tuple[bytes, str]:
    boundary = "mnist-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="digit.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def json_body(obj: object) -> tuple[bytes, str]:
    return json.dumps(obj).encode(), "application/json"


def workers_of_the_archive() -> int:
    """minWorkers of configs/model-config.yaml, which `make archive` packs (the CPU profile: 2)."""
    return int(yaml.safe_load((ROOT / "configs" / "model-config.yaml").read_text())["minWorkers"])


def worker_pids(server: TorchServe) -> set[int]:
    """The pids of the model's workers, every one READY: the same set before and after means no restart."""
    workers = server.describe()["workers"]
    assert [w["status"] for w in workers] == ["READY"] * workers_of_the_archive(), workers
    return {w["pid"] for w in workers}


# --- no server needed ----------------------------------------------------------------------------

def test_default_config_is_loopback_only_with_auth_on(tmp_path, monkeypatch):
    for kind in ("INFERENCE", "MANAGEMENT", "METRICS"):
        monkeypatch.delenv(f"{kind}_ADDRESS", raising=False)
    server = TorchServe(run_dir=tmp_path, model_store=tmp_path / "store")
    props = dict(line.split("=", 1) for line in server.write_properties().read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    for kind in ("inference", "management", "metrics"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", props[f"{kind}_address"]), props[f"{kind}_address"]
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["max_request_size"] == str(MAX_REQUEST_SIZE)


def test_the_log4j_config_parses():
    # A malformed file (e.g. "--" inside an XML comment) makes log4j fall back to its own console-only
    # defaults without failing the start: no ts_log.log, no access_log.log.
    root = ElementTree.parse(ROOT / "configs" / "log4j2.xml").getroot()
    assert {a.get("name") for a in root.iter("RollingFile")} == {
        "access_log", "model_log", "model_metrics", "ts_log", "ts_metrics"}


@pytest.fixture
def no_java(tmp_path, monkeypatch):
    """`make test-fast` runs where no Java is installed: the checks before a start must not need it."""
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def test_tampered_archive_is_refused_before_anything_starts(tiny_archive, tmp_path, no_java):
    store = tmp_path / "store"
    shutil.copytree(tiny_archive[1].path.parent, store)
    mar = store / "mnist.mar"
    data = bytearray(mar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mar.write_bytes(bytes(data))  # mnist.mar.sha256 still records the original
    server = TorchServe(run_dir=tmp_path / "run", model_store=store, addresses=loopback_addresses())
    with pytest.raises(ServerError, match=r"does not match the SHA-256 recorded by `make archive`"):
        server.start(timeout=30)
    (store / "mnist.mar.sha256").unlink()
    with pytest.raises(ServerError, match=r"mnist\.mar\.sha256 is missing: rebuild the archive"):
        server.start(timeout=30)
    assert server.running_pid() is None
    assert not (tmp_path / "run").exists()  # refused before the run directory was even made


def test_missing_archive_and_stopping_nothing(tmp_path, no_java):
    server = TorchServe(run_dir=tmp_path / "run", model_store=tmp_path / "empty", addresses=loopback_addresses())
    with pytest.raises(ServerError, match=r"no archive at .*mnist\.mar: run `make archive` first"):
        server.start(timeout=30)
    assert server.stop() is False


def test_a_shared_run_directory_is_refused_not_locked_down(tiny_archive, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: making it 0700 would lock every other user out
    server = TorchServe.on_free_ports(shared, tiny_archive[1].path.parent)
    with pytest.raises(ServerError, match=r"is a shared directory \(sticky bit, like /tmp\): set SERVE_DIR"):
        server.start(timeout=30)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and server.running_pid() is None



@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's takes root")
def test_a_run_directory_of_another_user_keeps_its_mode(tmp_path):
    """As in a container run as another uid than the volume's owner (group access, docker/Dockerfile):
    only the owner may chmod it, so the start leaves it as it is rather than failing."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o770)
    os.chown(theirs, 65534, 0)
    make_private_dir(theirs)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o770


# --- one real TorchServe for the rest of the module ----------------------------------------------

@pytest.fixture(scope="module")
def server(trained_archive, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve")
    ts = TorchServe.on_free_ports(run_dir, trained_archive.path.parent, model_name="mnist", auth=True)
    processes: list[psutil.Process] = []
    try:
        ts.start(timeout=120)
        yield ts
        pid = ts.running_pid()
        assert pid is not None, f"TorchServe died during the tests; see {run_dir}/ts_log.log"
        frontend = psutil.Process(pid)
        processes = [frontend, *frontend.children(recursive=True)]
        workers = [p for p in processes if "model_service_worker" in " ".join(p.cmdline())]
        assert len(workers) == workers_of_the_archive(), [p.cmdline() for p in processes]
    finally:
        stopped = ts.stop()
    assert stopped
    survivors = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], f"still running after stop(): {survivors}"
    assert ts.running_pid() is None
    assert not ts.pid_file.exists() and not (run_dir / "key_file.json").exists()


@pytest.fixture(scope="module")
def expected_digits(trained_checkpoint, mnist_test_images) -> list[int]:
    """What the trained model answers offline (training path) for the first 100 test images."""
    images, _ = mnist_test_images
    return offline_probabilities(trained_checkpoint, images[:100]).argmax(1).tolist()


@pytest.mark.slow
def test_server_runs_the_archived_model_config(server):
    info = server.describe()
    summary = (info["modelName"], info["modelVersion"], info["batchSize"], info["maxBatchDelay"])
    assert summary == ("mnist", "1.0", 32, 1)  # configs/model-config.yaml, packed in the .mar
    assert [w["status"] for w in info["workers"]] == ["READY"] * workers_of_the_archive() == ["READY"] * 2
    # serving/worker/worker_io.py: each worker reads TorchServe's frames through one buffer, once loaded.
    assert server.log_tail("model_log.log", 10_000).count("reads frames through a 256 KiB buffer") == 2


@pytest.mark.slow
def test_every_input_form_returns_the_digit(server, expected_digits, mnist_test_images):
    images, labels = mnist_test_images
    assert expected_digits[0] == labels[0] == 7  # MNIST test image 0 is a clear 7
    png = encode_png(images[0])
    forms = {
        "octet-stream": (png, "application/octet-stream"),
        "image/png": (png, "image/png"),
        "multipart data": multipart("data", png),
        "multipart file": multipart("file", png),
        "json base64": json_body({"data": base64.b64encode(png).decode()}),
        "json pixels": json_body({"pixels": images[0].tolist()}),
    }
    answers = {name: predict(server, body, ctype)[:2] for name, (body, ctype) in forms.items()}
    for name, (status, body) in answers.items():
        assert (status, body["digit"]) == (200, 7), name
    # Each form decodes to the same 28×28 digit, so the whole answer is identical.
    assert len({json.dumps(body, sort_keys=True) for _, body in answers.values()}) == 1

    sample = SAMPLE_7.read_bytes()
    for body, ctype in [(sample, "image/png"), multipart("data", sample),
                        json_body({"data": base64.b64encode(sample).decode()})]:
        status, answer, _ = predict(server, body, ctype)
        assert (status, answer["digit"]) == (200, 7), ctype


BAD_INPUTS = handler_rejections(SAMPLE_7.read_bytes())  # name: BadInput(body, content type, 400, message)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_400_that_leaves_the_worker_alone(server, name):
    bad = BAD_INPUTS[name]
    pids = worker_pids(server)
    status, answer, _ = predict(server, bad.body, bad.content_type)
    assert status == 400
    assert (answer["code"], answer["type"]) == (400, "InvalidInput")
    assert answer["message"].startswith(bad.message), answer["message"]
    status, answer, _ = predict(server, SAMPLE_7.read_bytes(), "image/png")
    assert (status, answer["digit"]) == (200, 7)
    assert worker_pids(server) == pids  # no crash, no restart


@pytest.mark.slow
def test_oversized_body_is_refused_by_the_frontend(server):
    pids = worker_pids(server)
    # Announced with `Expect: 100-continue`, as curl does for large bodies, the frontend refuses it on
    # the headers. (A client that just streams the body sees the 413 or, when the frontend closes the
    # connection mid-upload, a connection reset: about 1 in 4 here.)
    host, port = server.addresses["inference"].split("://")[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/predictions/mnist")
        for key, value in {"Content-Type": "application/octet-stream", "Content-Length": str(MAX_REQUEST_SIZE + 1),
                           "Authorization": f"Bearer {server.token('inference')}", "Expect": "100-continue"}.items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        assert (response.status, response.read()) == (413, b"")  # TorchServe sends no JSON body here
    finally:
        connection.close()
    status, answer, _ = predict(server, SAMPLE_7.read_bytes(), "image/png")
    assert (status, answer["digit"]) == (200, 7)
    assert worker_pids(server) == pids


@pytest.mark.slow
def test_binary_body_sent_as_a_form_is_refused_by_the_frontend(server):
    # curl's default for --data-binary is application/x-www-form-urlencoded. TorchServe's frontend
    # then tries to parse the image as a form and fails with a 500 before the handler sees it.
    pids = worker_pids(server)
    status, answer, _ = predict(server, SAMPLE_7.read_bytes(), "application/x-www-form-urlencoded")
    assert (status, answer["type"]) == (500, "ErrorDataDecoderException")
    assert worker_pids(server) == pids


def _batches_in_log(run_dir: Path) -> list[set[str]]:
    """Request ids of each batch the worker ran, from the handler's per-batch histogram in ts_log.log
    (its counters and gauges are emitted once a second, under the ids of whichever batch flushed them)."""
    log = (run_dir / "ts_log.log").read_text(errors="replace")
    return [set(UUID.findall(line)) for line in log.splitlines() if "[METRICS]mnist_handle_seconds." in line]


def assert_a_batch_mixes_good_and_bad(server: TorchServe, requests: list[tuple[bytes, str, int | str]], send,
                                      check_good=lambda answer: None, rounds: int = 5) -> None:
    """Send `requests` (body, content type, expected digit or start of the 400 message) all at once,
    up to `rounds` times, until ts_log.log shows a batch that held a good and a bad one; every answer
    must be right meanwhile. `send(server, body, content_type)` → (status, answer, request id)."""
    for _ in range(rounds):  # batching depends on timing; a few rounds make a mixed batch near certain
        barrier = threading.Barrier(len(requests))

        def at_once(request, barrier=barrier):
            barrier.wait()
            return send(server, request[0], request[1])

        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(at_once, requests))
        good_ids, bad_ids = set(), set()
        for (_, _, expected), (status, answer, request_id) in zip(requests, results, strict=True):
            if isinstance(expected, int):
                assert (status, answer["digit"]) == (200, expected)
                check_good(answer)
                good_ids.add(request_id)
            else:
                assert (status, answer["type"]) == (400, "InvalidInput")
                assert answer["message"].startswith(expected)
                bad_ids.add(request_id)
        deadline = time.monotonic() + 60  # the frontend logs the worker's metric lines asynchronously
        while not (good_ids | bad_ids) <= set().union(*_batches_in_log(server.run_dir), set()):
            assert time.monotonic() < deadline, "the round's requests never showed up in ts_log.log"
            time.sleep(0.1)
        if any(batch & good_ids and batch & bad_ids for batch in _batches_in_log(server.run_dir)):
            return
    pytest.fail(f"{rounds} rounds of {len(requests)} concurrent requests never put a good and a bad one in one batch")


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_a_bad_one_fails_only_itself(server, expected_digits,
                                                                        mnist_test_images):
    images, _ = mnist_test_images
    bad = list(BAD_INPUTS.values())
    requests = []  # 16 at once: even positions good, odd positions bad
    for i in range(8):
        requests.append((encode_png(images[i]), "image/png", expected_digits[i]))
        requests.append((bad[i].body, bad[i].content_type, bad[i].message))
    assert_a_batch_mixes_good_and_bad(server, requests, predict)


@pytest.mark.slow
@pytest.mark.parametrize(("api", "token"), [
    ("inference", None), ("inference", "wrong"), ("inference", "management"),
    ("management", None), ("management", "wrong"), ("management", "inference"),
])
def test_missing_or_wrong_token_is_refused(server, api, token):
    # TorchServe 0.12 answers a refused token with 400 InvalidKeyException (not 401): upstream behaviour.
    headers = {"Content-Type": "image/png"}
    if token is not None:
        key = server.token(token) if token in ("inference", "management") else "wrong"
        headers["Authorization"] = f"Bearer {key}"
    if api == "inference":
        status, raw, _ = call(server.url("inference", "/predictions/mnist"), SAMPLE_7.read_bytes(), headers)
    else:
        status, raw, _ = call(server.url("management", "/models"), headers=headers)
    assert status == 400
    assert json.loads(raw)["type"] == "InvalidKeyException"


@pytest.mark.slow
def test_models_cannot_be_registered_or_removed_at_run_time(server):
    for method, path in [("POST", "/models?url=mnist.mar"), ("POST", "/models?url=https://example.com/x.mar"),
                         ("DELETE", "/models/mnist")]:
        status, raw = server.request("management", path, method=method)
        assert (status, json.loads(raw)["type"]) == (405, "MethodNotAllowedException"), (method, path)
    assert worker_pids(server)  # still served


def _prometheus(server: TorchServe) -> dict[tuple[str, frozenset], float]:
    status, raw = server.request("metrics", "/metrics")
    assert status == 200
    return parse_samples(raw.decode())  # the project's one parser of Prometheus text


def _value(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


@pytest.mark.slow
def test_prometheus_metrics_count_predictions_by_digit(server):
    def counters() -> tuple[float, float]:
        samples = _prometheus(server)
        return (_value(samples, "MNISTPredictions", Digit="7", ModelName="mnist", Level="Model"),
                _value(samples, "MNISTRejectedRequests", ModelName="mnist", Level="Model"))

    sevens, rejected = settled(counters)  # earlier tests' counts may still be on their way
    for _ in range(3):
        assert predict(server, SAMPLE_7.read_bytes(), "image/png")[0] == 200
    assert predict(server, b"seven", "text/plain")[0] == 400
    deadline = time.monotonic() + 60  # the frontend turns the worker's metric log lines into samples
    while True:
        counts = tuple(now - then for now, then in zip(counters(), (sevens, rejected), strict=True))
        if counts == (3, 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts == (3, 1)
    after = _prometheus(server)
    for gauge in ("MNISTPreprocessTime", "MNISTInferenceTime"):
        assert _value(after, gauge, ModelName="mnist", Level="Model") > 0


@pytest.mark.slow
def test_cli_predicts_and_reports_status_against_the_running_server(server):
    env = {**os.environ, "SERVE_DIR": str(server.run_dir), "INFERENCE_ADDRESS": server.addresses["inference"],
           "MANAGEMENT_ADDRESS": server.addresses["management"], "METRICS_ADDRESS": server.addresses["metrics"]}
    result = subprocess.run([sys.executable, "-m", "serving.cli", "predict", str(SAMPLE_7)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digit"] == 7
    result = subprocess.run([sys.executable, "-m", "serving.cli", "status"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The default archive's variant is auto: the status names what the workers chose, an exact variant.
    assert re.fullmatch(r"model mnist version 1\.0  batch 32  max delay \d+ ms  variant (fused|onnx)(, onnx)?",
                        lines[0]), lines[0]
    # A GPU host gives the worker a GPU (gpu True): both are a healthy worker.
    pids = worker_pids(server)
    for line in lines[1:]:
        found = re.fullmatch(r"  worker \d+  READY  pid (\d+)  gpu (True|False)  memory (\d+) MiB", line)
        assert found and int(found[1]) in pids, line
        assert int(found[3]) > 50  # the worker's resident memory (torch alone is more), not TorchServe's 0
    assert len(lines) == 1 + len(pids)


@pytest.mark.slow
def test_server_listens_on_loopback_only(server):
    frontend = psutil.Process(server.running_pid())
    # psutil < 6 (kserve pins it) names net_connections `connections`
    listening = [c.laddr for p in (frontend, *frontend.children(recursive=True))
                 for c in getattr(p, "net_connections", p.connections)("inet") if c.status == psutil.CONN_LISTEN]
    ports = {int(url.rsplit(":", 1)[1]) for url in server.addresses.values()} | set(server.grpc_ports.values())
    assert ports <= {a.port for a in listening}  # the three HTTP endpoints and the two gRPC ports
    assert {a.ip for a in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


@pytest.mark.slow
def test_tokens_never_reach_the_logs(server):
    # Runs after the tests above, so the logs hold refused and accepted calls of every kind.
    keys = {kind: entry["key"] for kind, entry in json.loads((server.run_dir / "key_file.json").read_text()).items()}
    assert set(keys) >= {"inference", "management"}
    files = [p for p in server.run_dir.rglob("*") if p.is_file() and p.name != "key_file.json"]
    assert any(p.name == "ts_log.log" for p in files) and any(p.name == "access_log.log" for p in files)
    for path in files:
        text = path.read_bytes()
        for kind, key in keys.items():
            assert key.encode() not in text, f"the {kind} key is in {path}"


@pytest.mark.slow
def test_each_log_line_goes_to_one_rotated_file(server):
    # configs/log4j2.xml: after the requests above, each is one line in access_log.log and none in
    # console.log (not rotated) or, twice, in ts_log.log; the frontend logs at INFO, not DEBUG.
    def text(name: str) -> str:
        return (server.run_dir / name).read_text(errors="replace")

    def answered() -> int:
        return sum('"POST /predictions/mnist HTTP/1.1" 200' in line for line in text("access_log.log").splitlines())

    before = answered()
    for _ in range(10):
        assert predict(server, SAMPLE_7.read_bytes(), "image/png")[0] == 200
    deadline = time.monotonic() + 60  # returns as soon as they are counted; the bound only stops a hang
    while answered() < before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answered() == before + 10
    assert "ACCESS_LOG" not in text("console.log") and "MODEL_LOG" not in text("console.log")
    frontend = text("ts_log.log")
    assert "ACCESS_LOG" not in frontend and "[DEBUG]" not in frontend
    started = [line for line in frontend.splitlines() if "Inference API bind to" in line]
    assert len(started) == 1, started  # once, not once per appender


@pytest.mark.slow
def test_a_second_server_can_start_beside_another(trained_archive, tmp_path):
    blockers = []
    for port in (7070, 7071):  # stand-in for another TorchServe's gRPC ports (a real one is even better)
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            blockers.append(sock)
        except OSError:
            sock.close()
    try:
        # At TorchServe's default gRPC ports it refuses early, naming the setting to change...
        blocked = TorchServe(run_dir=tmp_path / "a", model_store=trained_archive.path.parent,
                             addresses=loopback_addresses())
        with pytest.raises(ServerError, match=r"gRPC port 707[01] is in use .* set GRPC_"):
            blocked.start(timeout=60)
        # ...and on its own ports it serves beside the other, its worker socket in its own run dir.
        second = TorchServe.on_free_ports(tmp_path / "b", trained_archive.path.parent)
        try:
            second.start(timeout=180)
            assert predict(second, SAMPLE_7.read_bytes(), "image/png")[1]["digit"] == 7
            assert any((tmp_path / "b" / "tmp").glob(".ts.sock.*"))
        finally:
            second.stop()
    finally:
        for sock in blockers:
            sock.close()



# --- a store whose path needs escaping, a run directory others could read ----------------------------

@pytest.fixture(scope="module")
def odd_store_server(tiny_archive, tmp_path_factory):
    """TorchServe with the model API open, its run directory (and so its private store, which allowed_urls
    names) under `run+(1)`: `+` and `(` are regex syntax in allowed_urls, and a backslash is an escape in a
    Java properties file. Started under a umask of 022, in a run directory that already exists with mode
    0755, as `logs/` in a fresh clone does."""
    base = tmp_path_factory.mktemp("odd")
    store = base / "store+(1)"
    shutil.copytree(tiny_archive[1].path.parent, store)
    run_dir = base / "run+(1)"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    ts = TorchServe.on_free_ports(run_dir, store, extra_properties={"enable_model_api": "true"})
    umask = os.umask(0o022)
    try:
        ts.start(timeout=120)
    finally:
        os.umask(umask)
    try:
        yield ts
    finally:
        ts.stop()


@pytest.mark.slow
def test_the_run_directory_and_the_key_file_are_the_owners_alone(odd_store_server):
    run_dir = odd_store_server.run_dir
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "key_file.json").stat().st_mode) == 0o600
    # TorchServe itself runs under umask 077: the key file is never open to others, not even between
    # its creation and TorchServe's chmod; its logs are not either.
    assert stat.S_IMODE((run_dir / "ts_log.log").stat().st_mode) == 0o600


@pytest.mark.slow
def test_allowed_urls_match_a_store_path_with_regex_characters(odd_store_server, tmp_path):
    server, store, served = odd_store_server, odd_store_server.model_store, odd_store_server.served_store
    assert predict(server, SAMPLE_7.read_bytes(), "image/png")[0] == 200
    (served / "sub").mkdir()
    shutil.copy2(served / "mnist.mar", served / "sub" / "copy.mar")
    shutil.copy2(store / "mnist.mar", tmp_path / "copy.mar")

    def register(url: str) -> tuple[int, dict]:
        query = urllib.parse.urlencode({"url": url, "model_name": "copy", "initial_workers": 1, "synchronous": "true"})
        status, raw = server.request("management", f"/models?{query}", method="POST", timeout=120)
        return status, json.loads(raw)

    outside = f"file://{tmp_path}/copy.mar"
    assert register(outside) == (404, {"code": 404, "type": "ModelNotFoundException",
                                       "message": f"Given URL {outside} does not match any allowed URL(s)"})
    unverified = f"file://{store}/mnist.mar"  # the model store itself: only verified copies are served
    assert register(unverified) == (404, {"code": 404, "type": "ModelNotFoundException",
                                          "message": f"Given URL {unverified} does not match any allowed URL(s)"})
    status, answer = register(f"file://{served}/sub/copy.mar")  # inside the private store: allowed
    assert status == 200, answer
    assert server.request("management", "/models/copy", method="DELETE")[0] == 200
