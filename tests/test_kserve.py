"""KServe without a cluster: the bundle is what the runtime reads, and the served model speaks v2.

The live tests run TorchServe on a bundle the way KServe's TorchServe runtime does (its arguments, its
TS_SERVICE_ENVELOPE=kservev2, TorchServe's default request decoding), on free loopback ports.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from serving.kserve import MODEL_CONFIG, BundleError, build_bundle, read_properties, start_local
from serving.worker import oip
from training.core.inputs.preprocess import PreprocessError

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, encode_png, offline_probabilities, unpack  # noqa: E402
from test_handler import InProcessWorker, as_json, raw  # noqa: E402
from test_serving import UUID, call  # noqa: E402


def v2_uint8(image, request_id: str | None = None) -> dict:
    body = {"inputs": [{"name": "input-0", "shape": [1, 28, 28], "datatype": "UINT8",
                        "data": image.reshape(-1).tolist()}]}
    return {**body, "id": request_id} if request_id else body


def v2_bytes(png: bytes) -> dict:
    data = [base64.b64encode(png).decode()]
    return {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": data}]}


# --- no server ----------------------------------------------------------------------------------

def test_bundle_is_what_the_runtime_reads(tiny_archive, tmp_path):
    _, archive = tiny_archive
    config = build_bundle(archive.path.parent, "mnist", tmp_path / "kserve")
    files = sorted(str(p.relative_to(tmp_path / "kserve")) for p in (tmp_path / "kserve").rglob("*") if p.is_file())
    # The signature travels with the archive (`make archive` signs): verify it before upload, KServe won't.
    assert files == ["bundle.json", "config/config.properties", "config/metrics.yaml", "model-store/mnist.mar",
                     "model-store/mnist.mar.sha256", "model-store/mnist.mar.sig"]
    props = read_properties(config)
    # The runtime passes --model-store=/mnt/models/model-store; the wrapper reads model_store too.
    assert props["model_store"] == "/mnt/models/model-store"
    # KServe's wrapper owns 8080 and forwards to inference_address; management answers its readiness poll.
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
    assert props["metrics_address"] == "http://0.0.0.0:8082"  # the runtime's prometheus.kserve.io/port
    assert (props["metrics_mode"], props["enable_metrics_api"]) == ("prometheus", "true")
    assert props["metrics_config"] == "/mnt/models/config/metrics.yaml"
    # TS_SERVICE_ENVELOPE from the runtime stays off (the handler speaks v2); no TorchServe token.
    assert (props["enable_envvars_config"], props["disable_token_authorization"]) == ("false", "true")
    assert "service_envelope" not in props
    settings = yaml.safe_load(MODEL_CONFIG.read_text())
    assert json.loads(props["model_snapshot"]) == {"name": "startup.cfg", "modelCount": 1, "models": {"mnist": {"1.0": {
        "defaultVersion": True, "marName": "mnist.mar", "minWorkers": settings["minWorkers"],
        "maxWorkers": settings["maxWorkers"], "batchSize": settings["batchSize"],
        "maxBatchDelay": settings["maxBatchDelay"], "responseTimeout": settings["responseTimeout"]}}}}
    assert (tmp_path / "kserve" / "model-store" / "mnist.mar").read_bytes() == archive.path.read_bytes()
    with zipfile.ZipFile(archive.path) as z:
        assert "serving/worker/oip.py" in z.namelist()  # the handler's v2 codec travels in the archive


def test_a_snapshot_can_carry_a_delay_an_archive_cannot(tiny_archive):
    """bench.serve_settings serves `maxBatchDelay` 0 through the snapshot the bundle uses, changing only the delay."""
    from bench.serve_settings import snapshot_property
    from serving.kserve import model_snapshot

    _, archive = tiny_archive
    snapshot = json.loads(snapshot_property(archive.path, 0)["model_snapshot"])
    expected = model_snapshot(archive.path)
    expected["models"]["mnist"]["1.0"]["maxBatchDelay"] = 0
    assert snapshot == expected


def test_bundle_replaces_only_a_bundle_it_made(tiny_archive, tmp_path):
    """`--out model_store` (or `.`) once deleted that directory before writing the bundle into it."""
    store = tmp_path / "model_store"
    shutil.copytree(tiny_archive[1].path.parent, store)
    before = sorted(p.name for p in store.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (store, mine, tmp_path):
        with pytest.raises(BundleError, match=f"^{out} exists and is not a bundle made by `make kserve-bundle`"):
            build_bundle(store, "mnist", out)
    cmd = [sys.executable, "-m", "serving.kserve", "--model-store", str(store), "--out", str(store)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (f"error: {store} exists and is not a bundle made by `make kserve-bundle` (no bundle.json): "
                          "refusing to delete it; choose another --out, or delete it yourself\n")
    assert sorted(p.name for p in store.iterdir()) == before and (mine / "notes.txt").read_text() == "keep me"
    # A new directory, an empty one and a bundle made before are (re)built.
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "new"):
        assert build_bundle(store, "mnist", out) == out / "config" / "config.properties"
        assert (out / "model-store" / "mnist.mar").read_bytes() == (store / "mnist.mar").read_bytes()


@pytest.mark.parametrize(("tensor", "message"), [
    ({"datatype": "FP32", "shape": [1, 28, 28], "data": [0.0] * 784}, "unsupported datatype 'FP32'"),
    ({"datatype": "UINT8", "shape": [2, 28, 28], "data": [0] * 1568}, "UINT8 input must have shape [1, 28, 28]"),
    ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 783}, "UINT8 data must hold 784 values"),
    ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [300] * 784}, "pixel values must be numbers in 0..255"),
    ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [0.5] * 784}, "UINT8 data must be integers"),
    ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}, "no digit found: the image is blank"),
    ({"datatype": "BYTES", "shape": [1], "data": ["not base64!"]}, "BYTES data is not valid base64"),
    ({"datatype": "BYTES", "shape": [2], "data": ["", ""]}, "BYTES input must have shape [1]"),
    ({"datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"seven").decode()]}, "not an image"),
])
def test_bad_v2_tensors_are_refused_with_a_message(tensor, message):
    with pytest.raises(PreprocessError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        oip.decode({"inputs": [{"name": "input-0", **tensor}]})


def test_v2_is_recognised_as_bytes_or_parsed_json_and_nothing_else():
    body = v2_bytes(b"png")
    assert oip.v2_body({"body": json.dumps(body).encode()}) == body  # this project's server: raw bytes
    assert oip.v2_body({"body": body}) == body  # TorchServe's default decoding (KServe's runtime)
    assert oip.v2_body({"body": b'{"data": "inputs"}'}) is None
    assert oip.v2_body({"body": {"pixels": []}}) is None
    assert oip.v2_body({"data": b"\x89PNG..."}) is None


def test_handler_answers_v2_and_json_in_one_batch(tiny_archive, mnist_test_images, tmp_path):
    """The handler without a server: a v2 body as bytes (this project's server) or already parsed
    (TorchServe's default decoding), beside a raw PNG, in one batch: same digit, same numbers."""
    images, _ = mnist_test_images
    threads = torch.get_num_threads()
    worker = InProcessWorker(unpack(tiny_archive[1].path, tmp_path / "model"), batch_size=4)
    torch.set_num_threads(threads)  # initialize() sets one thread per worker, process-wide
    parsed = [{"name": "body", "contentType": "application/json", "value": v2_bytes(encode_png(images[0]))}]
    answers = worker.handle([as_json(v2_uint8(images[0], "a")), parsed, as_json({"inputs": [{"datatype": "FP64"}]}),
                             raw(encode_png(images[0]))])
    assert [status for status, _ in answers] == [200, 200, 400, 200]
    (_, by_tensor), (_, by_bytes), (_, error), (_, plain) = answers
    assert (by_tensor["id"], by_bytes["id"]) == ("a", "req-1")  # the request's id, else TorchServe's
    assert by_tensor["outputs"] == by_bytes["outputs"]
    assert by_tensor["outputs"][0]["data"] == [plain["probabilities"][str(d)] for d in range(10)]
    assert by_tensor["outputs"][1]["data"] == [plain["digit"]]
    assert error == {"error": "'shape' must be a list of non-negative integers"}


def test_deep_v2_json_is_a_400_in_the_v2_shape(tiny_archive, tmp_path):
    """The JSON depth bound guards v2 bodies too: 50,000 nested lists (50 KB) would otherwise reach
    json.loads, whose RecursionError became a 500."""
    threads = torch.get_num_threads()
    worker = InProcessWorker(unpack(tiny_archive[1].path, tmp_path / "model"))
    torch.set_num_threads(threads)
    deep = b'{"inputs": [{"name": "input-0", "shape": [1], "datatype": "UINT8", "data": ' + \
        b"[" * 50_000 + b"]" * 50_000 + b"}]}"
    answers = worker.handle([raw(deep, "application/json"), raw(b'{"inputs": [', "application/json")])
    assert answers == [(400, {"error": "JSON nested too deeply: at most 32 levels"}),
                       (400, {"error": "malformed JSON body"})]


# --- TorchServe run as KServe's runtime runs it -----------------------------------------------------

@pytest.fixture(scope="module")
def runtime(trained_archive, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("kserve") / "bundle"
    build_bundle(trained_archive.path.parent, "mnist", bundle)
    server = start_local(bundle, tmp_path_factory.mktemp("kserve-run"), envelope="kservev2")
    try:
        yield server
    finally:
        assert server.stop()


def infer(server, body: dict | bytes, path: str = "/v2/models/mnist/infer") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, raw, _ = call(server.url("inference", path), data, {"Content-Type": "application/json"})
    return status, json.loads(raw)


@pytest.mark.slow
def test_v2_requests_answer_known_digits(runtime, trained_checkpoint, mnist_test_images):
    images, labels = mnist_test_images
    offline = offline_probabilities(trained_checkpoint, images[:8])
    status, answer = infer(runtime, v2_uint8(images[0], request_id="req-7"))
    assert status == 200
    assert {k: answer[k] for k in ("id", "model_name", "model_version")} == {
        "id": "req-7", "model_name": "mnist", "model_version": "1.0"}
    probs, digit, digit_like = answer["outputs"]
    assert (probs["name"], probs["datatype"], probs["shape"]) == ("probabilities", "FP32", [1, 10])
    assert (digit_like["name"], digit_like["datatype"], digit_like["shape"]) == ("is_digit", "BOOL", [1])
    assert (digit["name"], digit["datatype"], digit["shape"], digit["data"]) == ("digit", "INT64", [1], [7])
    assert labels[0] == 7
    # The archive serves the fused variant (batch norm folded into the convs): equal up to float rounding.
    assert max(abs(a - b) for a, b in zip(probs["data"], offline[0].tolist(), strict=True)) < 1e-4
    for i in range(8):  # the same digits as the training code computes offline, in both input forms
        for body in (v2_uint8(images[i]), v2_bytes(encode_png(images[i]))):
            for path in ("/v2/models/mnist/infer", "/predictions/mnist"):  # the wrapper posts to the second
                status, answer = infer(runtime, body, path)
                assert (status, answer["outputs"][1]["data"]) == (200, [offline[i].argmax().item()]), (i, path)
                assert UUID.fullmatch(answer["id"])  # no id sent: TorchServe's request id


@pytest.mark.slow
def test_v2_and_json_requests_batch_together(runtime, mnist_test_images):
    images, _ = mnist_test_images
    png = encode_png(images[0])

    def one(i: int) -> tuple[int, object]:
        if i % 3 == 0:  # this project's JSON API, on the same model in the same batches
            status, raw, _ = call(runtime.url("inference", "/predictions/mnist"), png, {"Content-Type": "image/png"})
            return status, json.loads(raw)["digit"]
        body = v2_uint8(images[0]) if i % 3 == 1 else {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                                    "data": [1.0]}]}
        status, answer = infer(runtime, body)
        return status, answer["outputs"][1]["data"] if status == 200 else answer

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(96)))
    for i, result in enumerate(results):
        expected = (200, 7) if i % 3 == 0 else (200, [7]) if i % 3 == 1 else \
            (400, {"error": "unsupported datatype 'FP32': send BYTES (a base64 image) or UINT8 (28x28 pixels)"})
        assert result == expected, i


@pytest.mark.slow
def test_bad_v2_input_gets_the_v2_error_shape(runtime):
    status, answer = infer(runtime, {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES",
                                                 "data": ["bm90IGFuIGltYWdl"]}]})
    assert (status, answer) == (400, {"error": "not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes"})
    status, answer = infer(runtime, {"inputs": []})
    assert (status, answer) == (400, {"error": "'inputs' must hold exactly one tensor (one digit per request)"})


# --- the TorchServe runtime image: every packed module imports with only its packages ---------------

TORCHSERVE_DOCKERFILE = ROOT / "deploy" / "kserve" / "torchserve.Dockerfile"
# What pytorch/torchserve-kfs:0.12.0 brings itself (TorchServe, and the torch it runs); all else must be
# installed by the Dockerfile.
RUNTIME_BASE = {"torch", "torchserve"}
# Imports every module packed in the archive, with a finder that refuses every top-level module outside the
# standard library, the archive and the allowed distributions: what the image would lack fails here too.
ONLY_THESE = """
import importlib, importlib.abc, json, sys
from pathlib import Path
model_dir, allowed, names = sys.argv[1], set(json.loads(sys.argv[2])), json.loads(sys.argv[3])

class OnlyTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in allowed or top in ("training", "serving"):
            return None
        raise ModuleNotFoundError(f"No module named {top!r} in the image", name=top)

sys.meta_path.insert(0, OnlyTheImage())
sys.path.insert(0, model_dir)
for name in names:
    module = importlib.import_module(name)
    assert Path(module.__file__).is_relative_to(model_dir), module.__file__
print("imported", len(names))
"""


def dockerfile_packages(path) -> set[str]:
    """The distributions the Dockerfile's `pip install` lines name."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = path.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    return {canonicalize_name(Requirement(req).name) for line in lines for req in re.findall(r'"([^"]+)"', line)}


def with_dependencies(names: set[str]) -> set[str]:
    """`names` and everything they require (no extras), as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def top_level_modules(distributions: set[str]) -> set[str]:
    from importlib import metadata

    from packaging.utils import canonicalize_name

    return {module for module, dists in metadata.packages_distributions().items()
            if any(canonicalize_name(d) in distributions for d in dists)}


def packed_modules(model_dir) -> list[str]:
    return sorted(".".join(p.relative_to(model_dir).with_suffix("").parts).removesuffix(".__init__")
                  for package in ("training", "serving") for p in (model_dir / package).rglob("*.py"))


def import_with_only(model_dir, distributions: set[str]) -> subprocess.CompletedProcess:
    allowed = sorted(top_level_modules(with_dependencies(distributions)))
    return subprocess.run([sys.executable, "-c", ONLY_THESE, str(model_dir), json.dumps(allowed),
                           json.dumps(packed_modules(model_dir))], capture_output=True, text=True, cwd=model_dir)


def test_every_packed_module_imports_with_only_the_runtime_image_packages(tiny_archive, tmp_path):
    model_dir = unpack(tiny_archive[1].path, tmp_path / "model")
    declared = dockerfile_packages(TORCHSERVE_DOCKERFILE)
    result = import_with_only(model_dir, declared | RUNTIME_BASE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"imported {len(packed_modules(model_dir))}"
    # Imports inside functions (captum for explanations, ONNX Runtime for its variants) need the packages too.
    imported = set()
    for path in (model_dir / "training").rglob("*.py"):
        imported |= {node.names[0].name.split(".")[0] if isinstance(node, ast.Import) else node.module.split(".")[0]
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0)}
    third_party = imported - set(sys.stdlib_module_names) - {"training", "serving", "__future__"}
    assert third_party <= top_level_modules(with_dependencies(declared | RUNTIME_BASE)), third_party


def test_the_import_check_fails_without_a_package_the_code_imports(tiny_archive, tmp_path):
    """The check above can fail: the Dockerfile before this test (no pillow-heif) is refused."""
    model_dir = unpack(tiny_archive[1].path, tmp_path / "model")
    result = import_with_only(model_dir, dockerfile_packages(TORCHSERVE_DOCKERFILE) - {"pillow-heif"} | RUNTIME_BASE)
    assert result.returncode != 0 and "No module named 'pillow_heif' in the image" in result.stderr
