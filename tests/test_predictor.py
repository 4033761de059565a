"""The KServe predictor (serving/predictor/) as a process on loopback: verified loads, v2 over REST and
gRPC with the same answers as TorchServe on the same archive, v2 errors, readiness, and drain.

Clients are independent of this repository's code: KServe's own InferenceRESTClient and
InferenceGRPCClient, and plain httpx. The slow tests start real processes on free loopback ports.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from serving.archive import build_archive
from serving.kserve import build_bundle, start_local
from serving.ports import free_ports
from serving.predictor.archive import PredictorError, unpack_verified
from serving.predictor.batcher import MicroBatcher

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, encode_png  # noqa: E402
from test_signing import _modified, _unsigned, _untrusted, store  # noqa: E402, F401  (the three damages, one store)

DAMAGES = pytest.mark.parametrize("damage", [_modified, _untrusted, _unsigned], ids=["modified", "untrusted",
                                                                                       "unsigned"])


class Predictor:
    """`python -m serving.predictor` on free loopback ports, its output in a log file."""

    def __init__(self, archive: Path, log: Path, *extra: str):
        self.http, self.grpc = free_ports(2)
        self.log = log
        cmd = [sys.executable, "-m", "serving.predictor", "--archive", str(archive), "--http_port", str(self.http),
               "--grpc_port", str(self.grpc), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with log.open("wb") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def wait_until_ready(self, timeout: float = 120) -> list[str]:
        """Poll /v2/health/ready until it answers; every earlier poll's outcome, for the readiness test."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                answer = httpx.get(f"{self.url}/v2/health/ready", timeout=30)  # a loaded machine may answer late
                seen.append(f"{answer.status_code} {answer.text}")
                if answer.status_code == 200:
                    return seen
            except httpx.TransportError as err:
                seen.append(type(err).__name__)
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def v2_bytes(png: bytes, request_id: str | None = None) -> dict:
    data = [base64.b64encode(png).decode()]
    body = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": data}]}
    return {**body, "id": request_id} if request_id else body


# --- no server ----------------------------------------------------------------------------------

@DAMAGES
def test_the_predictor_refuses_what_serve_refuses(store, tmp_path, damage):  # noqa: F811
    reason = damage(store, tmp_path)
    with pytest.raises(PredictorError, match=reason) as refused:
        unpack_verified(store / "mnist.mar", tmp_path / "work")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "work" / "model").exists()  # nothing unpacked, nothing imported


def test_the_batcher_batches_what_waits_and_holds_no_lone_request():
    sizes: list[int] = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.05)  # a model's forward pass: requests arriving meanwhile queue up
        return [item * 2 for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=8)
        assert await batcher.submit(1) == 2  # alone: answered at once, in a batch of one
        answers = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        assert answers == [2 * i for i in range(20)]

    asyncio.run(scenario())
    assert sizes[0] == 1 and max(sizes) == 8 and sum(sizes) == 21  # the 20: batches of at most 8


def test_a_failing_batch_fails_its_requests_not_the_batcher():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model broke")
        return items

    async def scenario():
        batcher = MicroBatcher(run)
        with pytest.raises(RuntimeError, match="model broke"):
            await batcher.submit(1)
        assert await batcher.submit(2) == 2

    asyncio.run(scenario())


# --- the predictor as a process -------------------------------------------------------------------

@pytest.mark.slow
@DAMAGES
def test_a_refused_archive_never_listens(store, tmp_path, damage):  # noqa: F811
    reason = damage(store, tmp_path)
    predictor = Predictor(store / "mnist.mar", tmp_path / "predictor.log")
    assert predictor.process.wait(120) == 1
    lines = predictor.log.read_text().strip().splitlines()
    assert lines[-1].startswith("error: ") and reason in lines[-1], lines[-5:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{predictor.url}/v2/health/ready")


@pytest.fixture(scope="module")
def parity_archive(trained_checkpoint, tmp_path_factory):
    """The trained model archived with one variant (fused): `auto`, the default, times its candidates in
    each process, and two processes may pick two exact variants whose probabilities differ in the 6th
    decimal. The same variant on both servers is what "the same answers" means."""
    return build_archive(trained_checkpoint, tmp_path_factory.mktemp("parity-store"), "mnist", "1.0", "fused")


@pytest.fixture(scope="module")
def predictor(parity_archive, tmp_path_factory):
    log = tmp_path_factory.mktemp("predictor") / "predictor.log"
    server = Predictor(parity_archive.path, log)
    try:
        server.polls = server.wait_until_ready()
        yield server
    finally:
        assert server.stop() == 0, log.read_text()[-2000:]


@pytest.mark.slow
def test_ready_only_once_the_verified_model_is_loaded(predictor):
    """Nothing listens while the archive is verified, unpacked and loaded: no poll saw a false or a 503."""
    assert predictor.polls[-1] == '200 {"ready":true}'
    assert set(predictor.polls[:-1]) <= {"ConnectError"}
    log = predictor.log.read_text()
    assert log.index("verified (sha256") < log.index("loaded on") < log.index("Uvicorn running")
    model = httpx.get(f"{predictor.url}/v2/models/mnist/ready").json()
    assert model == {"name": "mnist", "ready": True}
    answer = httpx.post(f"{predictor.url}/v2/models/mnist/infer", json=v2_bytes(encode_png(np.eye(28) * 255)))
    assert answer.status_code == 200
    metrics = httpx.get(f"{predictor.url}/metrics").text  # KServe's Prometheus histograms, per model
    assert 'request_predict_seconds_count{model_name="mnist"}' in metrics


@pytest.fixture(scope="module")
def torchserve(parity_archive, tmp_path_factory):
    """The same archive on TorchServe, as `make kserve-bundle` lays it out (no token, loopback)."""
    bundle = tmp_path_factory.mktemp("kserve") / "bundle"
    build_bundle(parity_archive.path.parent, "mnist", bundle)
    server = start_local(bundle, tmp_path_factory.mktemp("kserve-run"), envelope=None)
    try:
        yield server
    finally:
        server.stop()


async def _gather(limit: int, jobs):
    semaphore = asyncio.Semaphore(limit)

    async def one(job):
        async with semaphore:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


def _png_tensor(png: bytes, kind: str) -> InferInput:
    """gRPC: the image's own bytes; REST: base64 text, in JSON or in the binary extension (kserve 0.21's REST
    server reads binary BYTES as UTF-8 text)."""
    tensor = InferInput("input-0", [1], "BYTES")
    data = png if kind == "grpc" else base64.b64encode(png).decode()
    tensor.set_data_from_numpy(np.array([data], dtype=object), binary_data=kind != "rest-json")
    return tensor


@pytest.fixture(scope="module")
def torchserve_answers(torchserve, mnist_test_images) -> list[tuple]:
    """TorchServe's /predictions answers for the 10k test digits as PNG: (digit, probabilities, is_digit)."""
    pngs = [encode_png(image) for image in mnist_test_images[0]]

    async def ask():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(png):
                answer = await client.post(torchserve.url("inference", "/predictions/mnist"), content=png,
                                           headers={"Content-Type": "image/png"})
                body = answer.json()
                return body["digit"], [body["probabilities"][str(d)] for d in range(10)], body["is_digit"]
            return await _gather(16, [lambda p=p: one(p) for p in pngs])

    return asyncio.run(ask())


def predictor_answers(url: str, grpc_port: int, pngs: list[bytes], kind: str) -> list[tuple]:
    """The predictor's answers over v2 (`kind`: rest-json, rest-binary, grpc), through KServe's own clients."""
    async def ask():
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        grpc_client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=60)

        async def one(i, png):
            request = InferRequest("mnist", [_png_tensor(png, kind)], request_id=f"{kind}-{i}")
            if kind == "grpc":
                response = await grpc_client.infer(request)
            else:
                response = await rest.infer(url, request, model_name="mnist")
            assert response.id == request.id
            out = {o.name: o.as_numpy() for o in response.outputs}
            return int(out["digit"][0]), out["probabilities"][0].tolist(), bool(out["is_digit"][0])
        try:
            return await _gather(16, [lambda i=i, p=p: one(i, p) for i, p in enumerate(pngs)])
        finally:
            await rest.close()
            await grpc_client.close()

    return asyncio.run(ask())


def assert_same_answers(answers: list[tuple], expected: list[tuple], kind: str) -> None:
    assert [a[0] for a in answers] == [e[0] for e in expected], kind
    assert [a[2] for a in answers] == [e[2] for e in expected], kind
    # Both round to 6 decimals (the v2 FP32 tensor holds them as float32); batches of other sizes may
    # move the last decimal by one.
    worst = max(abs(p - q) for a, e in zip(answers, expected, strict=True) for p, q in zip(a[1], e[1], strict=True))
    assert worst < 2e-6, (kind, worst)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rest-json", "rest-binary", "grpc"])
def test_all_test_digits_agree_with_torchserve(predictor, torchserve_answers, mnist_test_images, kind):
    pngs = [encode_png(image) for image in mnist_test_images[0]]
    assert_same_answers(predictor_answers(predictor.url, predictor.grpc, pngs, kind), torchserve_answers, kind)


IMAGE = "localhost/mnist-kserve:cpu"  # `make kserve-image`


@pytest.fixture(scope="module")
def kserve_image() -> str:
    """`make kserve-image` from this checkout: cached layers make a rebuild a few minutes; the first build
    (the Debian base, then the locked packages: GBs of wheels) takes 15 minutes or more."""
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("the image needs buildah, run as root (`make system-deps` installs it)")
    built = subprocess.run([str(ROOT / "docker" / "kserve.sh")], capture_output=True, text=True, timeout=3600,
                           cwd=ROOT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE


@pytest.mark.slow
def test_the_image_serves_all_test_digits_like_torchserve(kserve_image, parity_archive, signing_key_dir,
                                                           torchserve_answers, mnist_test_images, tmp_path):
    """The predictor image as a pod runs it: the bundle's model store and the trusted public keys mounted
    read-only, nothing else from this checkout; `buildah run --network host`, bound to loopback."""
    mounts = {"store": tmp_path / "store", "trusted": tmp_path / "trusted"}
    shutil.copytree(parity_archive.path.parent, mounts["store"])
    shutil.copytree(signing_key_dir / "trusted", mounts["trusted"])
    for folder in mounts.values():  # the image runs as uid 10001, as in a pod
        folder.chmod(0o755)
        for path in folder.iterdir():
            path.chmod(0o644)
    tmp_path.chmod(0o755)
    http, grpc_port = free_ports(2)
    container = subprocess.run(["buildah", "from", "--pull-never", kserve_image], capture_output=True, text=True,
                               check=True).stdout.strip()
    command = ["buildah", "run", "--isolation", "chroot", "--network", "host",
               "-v", f"{mounts['store']}:/mnt/models/model-store:ro", "-v", f"{mounts['trusted']}:/app/trusted:ro",
               container, "--", "python", "-m", "serving.predictor", "--host", "127.0.0.1",
               "--http_port", str(http), "--grpc_port", str(grpc_port),
               "--archive", "/mnt/models/model-store/mnist.mar"]
    log = tmp_path / "image.log"
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        pngs = [encode_png(image) for image in mnist_test_images[0]]
        for kind in ("rest-json", "grpc"):
            assert_same_answers(predictor_answers(url, grpc_port, pngs, kind), torchserve_answers, kind)
    finally:
        stop_in_container(process)
        subprocess.run(["buildah", "rm", container], capture_output=True)
    assert "verified (sha256" in log.read_text()


def stop_in_container(process: subprocess.Popen) -> None:
    """SIGTERM to the predictor inside `buildah run` (docker/common.sh's buildah_stop does the same): buildah
    answers a signal with SIGKILL to its command; chroot isolation shares the host's process table."""
    import psutil

    predictors = [child for child in psutil.Process(process.pid).children(recursive=True)
                  if child.cmdline()[1:3] == ["-m", "serving.predictor"]]
    for child in predictors:
        child.terminate()
    try:
        assert process.wait(60) == 0  # the predictor's own exit status, through buildah run
    finally:
        for child in predictors:  # never left behind, even where SIGTERM did not stop it
            if child.is_running():
                child.kill()
        if process.poll() is None:
            process.kill()
            process.wait()


BAD_V2 = [  # body → the error both servers answer, word for word (serving/worker/oip.py)
    ({"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]},
     "not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes"),
    ({"inputs": []}, "'inputs' must hold exactly one tensor (one digit per request)"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
     "unsupported datatype 'FP32': send BYTES (a base64 image) or UINT8 (28x28 pixels)"),
    ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]},
     "no digit found: the image is blank"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "message"), BAD_V2)
def test_bad_v2_input_gets_the_same_4xx_from_both_servers(predictor, torchserve, body, message):
    for url in (f"{predictor.url}/v2/models/mnist/infer", torchserve.url("inference", "/v2/models/mnist/infer")):
        answer = httpx.post(url, json=body, timeout=30)
        assert (answer.status_code, answer.json()) == (400, {"error": message}), url


@pytest.mark.slow
def test_what_is_not_a_v2_request_gets_a_v2_error_body(predictor):
    png = encode_png(np.full((28, 28), 0, dtype=np.uint8) + np.eye(28, dtype=np.uint8) * 255)
    deep = b'{"inputs": [{"name": "input-0", "shape": [1], "datatype": "UINT8", "data": ' + \
        b"[" * 50_000 + b"]" * 50_000 + b"}]}"
    cases = [
        (b'{"inputs": [', "application/json", "malformed JSON body"),
        (deep, "application/json", None),
        (png, "image/png", "received byte inputs, but the"),  # KServe's: no JSON header before binary data
        (b'{"inputs": [{"name": "x"}]}', "application/json", "not a v2 inference request: InferenceRequest.inputs.0."),
    ]
    for body, content_type, message in cases:
        answer = httpx.post(f"{predictor.url}/v2/models/mnist/infer", content=body,
                            headers={"Content-Type": content_type}, timeout=30)
        assert 400 <= answer.status_code < 500 and set(answer.json()) == {"error"}, (body[:40], answer.text[:200])
        assert message is None or answer.json()["error"].startswith(message)
    raw = InferInput("input-0", [1], "BYTES")  # the image's own bytes in REST's binary extension
    raw.set_data_from_numpy(np.array([png], dtype=object), binary_data=True)
    body, json_length = InferRequest("mnist", [raw]).to_rest()
    answer = httpx.post(f"{predictor.url}/v2/models/mnist/infer", content=body, timeout=30,
                        headers={"Inference-Header-Content-Length": str(json_length),
                                 "Content-Type": "application/octet-stream"})
    assert answer.status_code == 400 and "send the image base64-encoded" in answer.json()["error"]
    v1 = httpx.post(f"{predictor.url}/v1/models/mnist:predict", json={"instances": [[0]]}, timeout=30)
    assert v1.status_code == 400 and "Open Inference Protocol v2" in v1.json()["error"]


@pytest.mark.slow
def test_bad_input_over_grpc_is_invalid_argument(predictor):
    async def ask():
        client = InferenceGRPCClient(f"127.0.0.1:{predictor.grpc}")
        try:
            await client.infer(InferRequest("mnist", [_png_tensor(b"seven", "grpc")]))
        finally:
            await client.close()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(ask())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes"


RACE_S = 1.0  # a request written this close to SIGTERM may race the close of an idle keep-alive connection


@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_in_flight(trained_archive, tmp_path, mnist_test_images):
    """32 clients on keep-alive connections; at the signal they stop sending, as a load balancer does once
    the pod leaves the endpoints (the preStop pause in the manifests): every request sent is answered 200,
    those in flight at the signal included, and the process exits 0. One exception, which HTTP/1.1 keep-alive
    has everywhere: a request written in the last moment before the signal (RACE_S) may reach a connection
    the server, not yet having read it, takes for idle and closes. Each request is timed from the moment its
    body was written (httpx's trace), not from when its thread began it: on a loaded CI machine a thread
    once waited 0.25 s between the two."""
    images, _ = mnist_test_images
    body = json.dumps(v2_bytes(encode_png(images[0]))).encode()
    server = Predictor(trained_archive.path, tmp_path / "predictor.log")
    server.wait_until_ready()
    outcomes: list[tuple[float, float, str]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()

                def written(event: str, _info: dict) -> None:
                    nonlocal sent
                    if event == "http11.send_request_body.complete":
                        sent = time.monotonic()

                try:
                    answer = http.post(f"{server.url}/v2/models/mnist/infer", content=body,
                                       headers={"Content-Type": "application/json"}, extensions={"trace": written})
                    ok = answer.status_code == 200 and answer.json()["outputs"][1]["data"] == [7]
                    outcome = "200" if ok else f"{answer.status_code} {answer.text[:100]}"
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                with lock:
                    outcomes.append((sent, time.monotonic(), outcome))

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    def settled_so_far() -> int:
        with lock:
            return sum(sent < time.monotonic() - RACE_S for sent, _, _ in outcomes)

    deadline = time.monotonic() + 120
    while settled_so_far() <= 100 and time.monotonic() < deadline:  # steady load: a count of answers, not a rate
        time.sleep(0.1)
    stop.set()
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(90)
    assert server.process.wait(60) == 0
    settled = [outcome for sent, _, outcome in outcomes if sent < signalled - RACE_S]
    assert len(settled) > 100 and set(settled) == {"200"}, Counter(settled)
    racing = {outcome for sent, _, outcome in outcomes if sent >= signalled - RACE_S}
    assert racing <= {"200", "ReadError", "RemoteProtocolError", "ConnectError"}, racing
    in_flight = [o for sent, done, o in outcomes if sent < signalled < done and o == "200"]
    assert in_flight  # sent before the signal, answered after it
