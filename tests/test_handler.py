"""serving/worker/handler.py without a server: TorchServe's own Context, request parsing and metrics cache
drive the handler in-process, and the packed handler runs from an unpacked .mar in a clean interpreter.
The end-to-end tests through a real TorchServe are in test_serving.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ts.context import Context
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.service import Service

from serving.archive import build_archive
from serving.worker.handler import LOW_CONFIDENCE, MNISTHandler
from serving.worker.requests import decode_request
from serving.worker.variants import DEFAULT_VARIANT, ONNX_FILES, SELF_CHECK_FILE
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.core.inputs.preprocess import PreprocessError
from training.core.ood import is_digit, ood_score
from training.core.precision import SelfCheckError
from training.core.tensors import normalize
from training.tools.ood_data import noise_images
from training.trust import outputs

# Shared fixtures (tiny_archive, trained_archive, trained_checkpoint) load as a plugin, so each
# exists once per session; helpers are imported by name, after registering for assert rewriting.
pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import (  # noqa: E402
    METRICS_YAML,
    ROOT,
    SAMPLE_7,
    TINY_MODEL,
    encode_png,
    manifest_of,
    offline_probabilities,
    save_tiny_checkpoint,
    unpack,
)

Request = list[dict]  # TorchServe's parameters of one request: name, contentType, value


def raw(body: bytes, content_type: str = "application/octet-stream") -> Request:
    return [{"name": "body", "contentType": content_type, "value": body}]


def multipart(field: str, png: bytes) -> Request:
    return [{"name": field, "contentType": "image/png", "value": png}]


def as_json(obj: object) -> Request:
    return raw(json.dumps(obj).encode(), "application/json")


class InProcessWorker:
    """The handler as TorchServe's Python worker drives it (ts/service.py), minus the socket: a real
    Context and metrics cache, requests parsed by TorchServe's own `retrieve_data_for_inference`."""

    def __init__(self, model_dir: Path, batch_size: int = 32) -> None:
        self.metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
        self.metrics.initialize_cache()
        self.metrics.model_name = "mnist"
        self.context = Context("mnist", str(model_dir), manifest_of(model_dir), batch_size, None, "0.12.0",
                               metrics=self.metrics)
        self.handler = MNISTHandler()
        self.handler.initialize(self.context)

    def handle(self, requests: list[Request], explain: frozenset[int] = frozenset()) -> list[tuple[int, dict]]:
        """`explain`: positions sent to /explanations (the frontend marks them with the header explain: True)."""
        batch = [{"requestId": f"req-{i}".encode(), "parameters": params,
                  "headers": [{"name": b"explain", "value": b"True"}] if i in explain else []}
                 for i, params in enumerate(requests)]
        processors, data, ids = Service.retrieve_data_for_inference(batch)
        self.context.request_processor, self.context.request_ids = processors, ids
        self.metrics.request_ids = ids
        bodies = self.handler.handle(data, self.context)
        assert len(bodies) == len(requests)
        for i in range(len(requests)):
            assert self.context.get_response_content_type(i) == "application/json"
            assert self.context.get_response_headers(i)["X-Model-Version"] == "1.0"  # every answer, errors too
        return [(self.context.get_response_status(i)[0], json.loads(b)) for i, b in enumerate(bodies)]

    def answers(self, pngs: list[bytes]) -> list[dict]:
        """Answers for many images, in batches of the worker's batch size as the server sends them."""
        size = self.context.system_properties["batch_size"]
        out = []
        for start in range(0, len(pngs), size):
            answers = self.handle([raw(p) for p in pngs[start : start + size]])
            assert [status for status, _ in answers] == [200] * len(answers)
            out += [body for _, body in answers]
        return out

    def digits(self, pngs: list[bytes]) -> list[int]:
        return [body["digit"] for body in self.answers(pngs)]


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # initialize() sets one thread per worker, process-wide


@pytest.fixture(scope="module")
def tiny_worker(tiny_archive, tmp_path_factory) -> InProcessWorker:
    return InProcessWorker(unpack(tiny_archive[1].path, tmp_path_factory.mktemp("tiny-unpacked")))


@pytest.fixture(scope="module")
def mnist_pngs(mnist_test_images) -> list[bytes]:
    """The first 1000 MNIST test images as PNG files, as a client would send them."""
    return [encode_png(image) for image in mnist_test_images[0][:1000]]


def assert_same_answer(body: dict, probabilities: torch.Tensor) -> None:
    """The handler's JSON against probabilities computed offline: same digit, values to rounding."""
    assert body["digit"] == int(probabilities.argmax())
    assert list(body["probabilities"]) == [str(d) for d in range(10)]
    assert list(body["probabilities"].values()) == pytest.approx(probabilities.tolist(), abs=2e-6)
    assert body["confidence"] == body["probabilities"][str(body["digit"])]


# --- the packed handler, on its own -------------------------------------------------------------

PACKED_WORKER = r"""
import json, sys
from pathlib import Path
model_dir, metrics_yaml, repo, *images = sys.argv[1:]
# The repository first on the path, as when a worker starts from a checkout: the handler must still
# import the training code packed beside it, not this one.
sys.path[:0] = [repo]
sys.path.append(model_dir)
import handler
from ts.context import Context
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.service import Service
metrics = MetricsCacheYamlImpl(config_file_path=metrics_yaml)
metrics.initialize_cache()
manifest = json.loads((Path(model_dir) / "MAR-INF" / "MANIFEST.json").read_text())
context = Context("mnist", model_dir, manifest, 4, None, "0.12.0", metrics=metrics)
worker = handler.MNISTHandler()
worker.initialize(context)
batch = [{"requestId": str(i).encode(), "parameters": [{"name": "body", "contentType": "image/png",
          "value": Path(p).read_bytes()}]} for i, p in enumerate(images)]
context.request_processor, data, context.request_ids = Service.retrieve_data_for_inference(batch)
metrics.request_ids = context.request_ids
bodies = worker.handle(data, context)
modules = ("handler", "training", "training.core.model", "training.core.inputs.preprocess", "training.core.ood",
           "training.core.explain")
print(json.dumps({"files": {m: sys.modules[m].__file__ for m in modules},
                  "status": [context.get_response_status(i)[0] for i in range(len(bodies))],
                  "bodies": [json.loads(b) for b in bodies]}))
"""


def test_packed_handler_runs_from_the_archive_alone(tiny_archive, mnist_test_images, tmp_path):
    checkpoint, archive = tiny_archive
    model_dir = unpack(archive.path, tmp_path / "model").resolve()
    images, _ = mnist_test_images
    inputs = []
    for i in range(3):
        inputs.append(tmp_path / f"{i}.png")
        inputs[-1].write_bytes(encode_png(images[i]))
    inputs.append(tmp_path / "empty.png")
    inputs[-1].write_bytes(b"")
    # -I: no PYTHONPATH, no user site, no current directory on sys.path.
    result = subprocess.run([sys.executable, "-I", "-c", PACKED_WORKER, str(model_dir), str(METRICS_YAML),
                             str(ROOT), *map(str, inputs)], cwd=model_dir, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for module, path in out["files"].items():
        assert Path(path).is_relative_to(model_dir), f"{module} imported from {path}, not from the archive"
    assert out["status"] == [200, 200, 200, 400]
    assert out["bodies"][3] == {"code": 400, "type": "InvalidInput", "message": "empty input: expected image bytes"}
    expected = offline_probabilities(checkpoint, images[:3])
    for body, probabilities in zip(out["bodies"][:3], expected, strict=True):
        assert_same_answer(body, probabilities)


def test_explanations_are_per_request_and_a_failing_explainer_fails_only_them(tiny_archive, mnist_test_images,
                                                                             tmp_path):
    worker = InProcessWorker(unpack(tiny_archive[1].path, tmp_path / "model"))
    png = encode_png(mnist_test_images[0][0])
    answers = worker.handle([raw(png), raw(png), raw(b"")], explain=frozenset({0, 2}))
    assert [status for status, _ in answers] == [200, 200, 400]
    explained, predicted = answers[0][1], answers[1][1]
    assert np.asarray(explained.pop("explanation")["attributions"]).shape == (28, 28)
    assert explained == predicted and "explanation" not in predicted
    assert predicted["is_digit"] is True  # the tiny checkpoint predates the detector: nothing is rejected

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("explainer bug")

    worker.handler.explainer = Broken()
    answers = worker.handle([raw(png), raw(png)], explain=frozenset({0}))
    assert answers[0] == (500, {"code": 500, "type": "InternalServerException",
                                "message": "could not explain the request"})
    assert answers[1] == (200, predicted)


# --- decoding: every accepted form, and train/serve parity ----------------------------------------

def test_every_input_form_gives_the_same_answer(tiny_worker, mnist_test_images):
    image = mnist_test_images[0][0]
    png = encode_png(image)
    forms = {
        "octet-stream": raw(png),
        "image/png": raw(png, "image/png"),
        "multipart data": multipart("data", png),
        "multipart file": multipart("file", png),
        "json base64": as_json({"data": base64.b64encode(png).decode()}),
        "json pixels": as_json({"pixels": image.tolist()}),
    }
    answers = {name: tiny_worker.handle([request])[0] for name, request in forms.items()}
    first = answers["octet-stream"]
    assert first[0] == 200
    assert all(answer == first for answer in answers.values()), answers


def test_decoded_images_are_exactly_the_training_tensors(mnist_test_images, mnist_pngs):
    images, _ = mnist_test_images
    images = images[:64]
    expected = normalize(images)  # what training.train feeds the model
    pngs = mnist_pngs[:64]
    assert torch.equal(normalize(np.stack([decode_request({"body": png}) for png in pngs])), expected)
    # Dark ink on white paper (a scan, a drawing app) is flipped back to MNIST's polarity exactly.
    inverted = [encode_png(255 - image.numpy()) for image in images]
    assert torch.equal(normalize(np.stack([decode_request({"body": png}) for png in inverted])), expected)
    pixels = [json.dumps({"pixels": image.tolist()}).encode() for image in images]
    assert torch.equal(normalize(np.stack([decode_request({"body": body}) for body in pixels])), expected)


@pytest.mark.parametrize(("request_", "message"), [
    ({}, "no image found"),
    ({"body": b'{"data": '}, "malformed JSON body"),
    ({"body": b'{"data": 7}'}, "'data' must be a base64-encoded image string"),
    ({"body": b'{"data": "not base64!"}'}, "'data' is not valid base64"),
    ({"body": b'{"image": "x"}'}, "JSON body must have 'data' (base64 image) or 'pixels'"),
    ({"body": json.dumps({"pixels": [[0] * 28] * 27}).encode()}, "pixels must have shape 28x28, got 27x28"),
    ({"body": json.dumps({"pixels": [[300] * 28] * 28}).encode()}, "pixel values must be numbers in 0..255"),
    ({"body": json.dumps({"pixels": [[0] * 28] * 28}).encode()}, "no digit found: the image is blank"),
    ({"body": encode_png(np.zeros((1, 1), np.uint8))}, "image too small: 1x1 pixels"),
])
def test_bad_request_is_a_preprocess_error_that_says_why(request_, message):
    with pytest.raises(PreprocessError) as err:
        decode_request(request_)
    assert str(err.value).startswith(message)


def test_bad_requests_in_a_batch_fail_only_themselves(tiny_worker, tiny_archive, mnist_test_images, caplog,
                                                      monkeypatch):
    images, _ = mnist_test_images
    png = encode_png(images[1])
    batch = [
        raw(png),
        raw(b""),
        raw(bytes(range(256)) * 4),
        as_json({"pixels": images[2].tolist()}),
        as_json({"data": "not base64!"}),
        raw(png[: len(png) // 2], "image/png"),
        raw(encode_png(np.zeros((1, 1), np.uint8)), "image/png"),
    ]
    tiny_worker.handler.metric_buffer.flush()  # what earlier tests left pending, before the capture
    # No timer emits in its own thread while this batch runs, however slowly: this thread flushes.
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="ts.metrics"):
        patch.setattr(tiny_worker.handler.metric_buffer, "interval", 3600.0)
        answers = tiny_worker.handle(batch)
        tiny_worker.handler.metric_buffer.flush()  # a worker's timer does this within a second
    assert [status for status, _ in answers] == [200, 400, 400, 200, 400, 400, 400]
    errors = [body for status, body in answers if status == 400]
    assert [(e["code"], e["type"]) for e in errors] == [(400, "InvalidInput")] * 5
    assert [e["message"].split(":")[0] for e in errors] == [
        "empty input", "not an image", "'data' is not valid base64", "could not decode the PNG image",
        "image too small"]
    # The good ones get what they get alone.
    assert answers[0] == tiny_worker.handle([raw(png)])[0]
    assert answers[3] == tiny_worker.handle([as_json({"pixels": images[2].tolist()})])[0]
    expected = offline_probabilities(tiny_archive[0], images[1:3])
    assert_same_answer(answers[0][1], expected[0])
    assert_same_answer(answers[3][1], expected[1])

    # Metrics, as TorchServe's metrics cache logs them for the frontend: one batch, 5 rejected, 2 predicted.
    # This thread's lines only: the timers of other in-process handlers may emit meanwhile.
    records = [r for r in caplog.records if r.thread == threading.get_ident()]
    lines = [r.getMessage() for r in records if r.getMessage().startswith("[METRICS]MNIST")]
    assert sum("MNISTPreprocessTime.Milliseconds:" in line for line in lines) == 1
    assert sum("MNISTInferenceTime.Milliseconds:" in line for line in lines) == 1
    assert any(line.startswith("[METRICS]MNISTRejectedRequests.Count:5|#ModelName:mnist,Level:Model|")
               for line in lines), lines
    predicted = {}
    for line in lines:
        if match := re.match(r"\[METRICS\]MNISTPredictions\.Count:(\d+)\|#Digit:(\d),ModelVersion:1\.0,"
                             r"ModelName:mnist,Level:Model\|", line):
            predicted[match[2]] = predicted.get(match[2], 0) + int(match[1])
    digits = [str(answers[0][1]["digit"]), str(answers[3][1]["digit"])]
    assert predicted == {d: digits.count(d) for d in digits}
    low = [r.getMessage() for r in records if "mnist_low_confidence_predictions_total" in r.getMessage()]
    expected_low = sum(max(a[1]["probabilities"].values()) < LOW_CONFIDENCE for a in (answers[0], answers[3]))
    assert [line.split("|")[0] for line in low] == (
        [f"[METRICS]mnist_low_confidence_predictions_total.Count:{expected_low}"] if expected_low else [])


def test_wild_input_forms_and_their_refusals_share_a_batch(tiny_worker, mnist_test_images):
    png = encode_png(mnist_test_images[0][0])
    text = base64.b64encode(png).decode()
    batch = [
        as_json({"data": "data:image/png;base64," + text}),  # canvas.toDataURL()
        raw(b"[" * 50_000, "application/json"),  # 50 KB: json.loads alone would raise RecursionError
        as_json({"data": "\n".join(text[i : i + 76] for i in range(0, len(text), 76))}),  # `base64` output
        as_json({"data": "data:text/html;base64," + text}),
        # Text bodies as editors and shells write them: a UTF-8 byte-order mark, leading blank space.
        raw(b"\xef\xbb\xbf" + json.dumps({"data": text}).encode(), "application/json"),
        raw(b"\xef\xbb\xbf" + json.dumps({"data": text}).encode(), "text/plain"),
        raw(b" \n data:image/png;base64," + text.encode(), "text/plain"),
    ]
    answers = tiny_worker.handle(batch)
    assert [status for status, _ in answers] == [200, 400, 200, 400, 200, 200, 200]
    assert answers[0] == answers[2] == answers[4] == answers[5] == answers[6] == tiny_worker.handle([raw(png)])[0]
    assert answers[1][1] == {"code": 400, "type": "InvalidInput",
                             "message": "JSON nested too deeply: at most 32 levels"}
    assert answers[3][1]["message"] == "'data' URL is not an image: text/html"


# --- with a trained model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_worker(trained_archive, tmp_path_factory) -> InProcessWorker:
    return InProcessWorker(unpack(trained_archive.path, tmp_path_factory.mktemp("trained-unpacked")))


@pytest.mark.slow
def test_handler_scores_the_test_accuracy_recorded_at_training(trained_worker, trained_checkpoint,
                                                               mnist_test_images, mnist_pngs):
    images, labels = mnist_test_images
    meta = json.loads((Path(trained_worker.context.system_properties["model_dir"]) / "model.json").read_text())
    n = 1000  # the slice the checkpoint was scored on (TRAIN_SLICE test_limit)
    digits = trained_worker.digits(mnist_pngs[:n])
    assert sum(d == y for d, y in zip(digits, labels[:n].tolist(), strict=True)) / n == meta["metrics"]["test_accuracy"]
    offline = offline_probabilities(trained_checkpoint, images[:n]).argmax(1).tolist()
    assert digits == offline
    assert trained_worker.handle([raw(SAMPLE_7.read_bytes(), "image/png")])[0][1]["digit"] == 7


@pytest.mark.slow
def test_one_batch_of_64_matches_the_offline_model(trained_worker, trained_checkpoint, mnist_test_images,
                                                  mnist_pngs):
    images, _ = mnist_test_images
    answers = trained_worker.handle([raw(png) for png in mnist_pngs[:64]])
    expected = offline_probabilities(trained_checkpoint, images[:64])
    for (status, body), probabilities in zip(answers, expected, strict=True):
        assert status == 200
        assert body["digit"] == int(probabilities.argmax())
        assert list(body["probabilities"].values()) == pytest.approx(probabilities.tolist(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["auto", "eager", "fused", "bf16", "onnx", "int8", "int8-legacy"])
def test_every_variant_serves_the_trained_model(variant, trained_checkpoint, mnist_test_images, mnist_pngs,
                                                tmp_path):
    archive = build_archive(trained_checkpoint, tmp_path / "store", "mnist", "1.0", variant)
    worker = InProcessWorker(unpack(archive.path, tmp_path / "model"))
    images, _ = mnist_test_images
    noise = [encode_png(image) for image in noise_images(20)]
    answers = worker.answers(mnist_pngs + noise)
    offline = offline_probabilities(trained_checkpoint, images[:1000]).argmax(1).tolist()
    disagree = sum(a["digit"] != b for a, b in zip(answers, offline, strict=False))
    # eager, fused and onnx compute the same function (fused folds batch norm into the convs): same digits.
    # int8 quantises weights and activations, bf16 rounds every weight and activation to 8 bits of
    # mantissa (or falls back to fused fp32 where slower): approximations, allowed a few borderline digits.
    approximate = variant.startswith("int8") or variant == "bf16"
    assert disagree <= (5 if approximate else 0), f"{variant}: {disagree} of 1000 digits differ"
    # "Not a digit": the fp32 model's verdicts, whichever model computed the detector's features.
    ckpt = load_checkpoint(trained_checkpoint)
    checked = torch.cat([images[:1000], torch.from_numpy(noise_images(20))])
    features, logits = outputs(model_from_checkpoint(ckpt), checked)
    verdicts = is_digit(ckpt["ood"], ood_score(ckpt["ood"], features, logits)).tolist()
    differ = sum(a["is_digit"] != v for a, v in zip(answers, verdicts, strict=True))
    assert differ <= (5 if approximate else 0), f"{variant}: {differ} of 1020 is_digit verdicts differ"
    assert not any(a["is_digit"] for a in answers[1000:])  # the noise
    if variant in ("onnx", "int8"):  # fp32 ONNX: the detector's features from the file's own second output
        assert worker.handler.model.has_features == (variant == "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["onnx", "int8"])
def test_a_variant_that_answers_unlike_fp32_is_refused_at_load(variant, trained_checkpoint, tmp_path):
    """The load-time self-check: another network's file planted as the variant's (an untrained one, whose
    answers are noise) is refused with the figure, as a CPU that computed int8 wrongly would be."""
    from training.tools.export import export_all

    model_dir = unpack(build_archive(trained_checkpoint, tmp_path / "store", "mnist", "1.0", variant).path,
                       tmp_path / "model")
    InProcessWorker(model_dir)  # the archive as built passes its self-check
    export_all(save_tiny_checkpoint(tmp_path / "tiny.pt"), tmp_path / "tiny", ("onnx",), None, log=lambda _: None)
    shutil.copyfile(tmp_path / "tiny" / "model.onnx", model_dir / ONNX_FILES[variant])
    with pytest.raises(SelfCheckError, match=rf"^variant {variant} agrees with the fp32 model on \d+ of 512 "
                       r"self-check digits \(\d+\.\d%; needs 99%\): refusing to serve it on this CPU \(.*\); "
                       r"archive another variant \(e\.g\. fused\)$"):
        InProcessWorker(model_dir)
    (model_dir / SELF_CHECK_FILE).unlink()
    with pytest.raises(SelfCheckError, match=f"variant {variant}: the archive has no {SELF_CHECK_FILE}"):
        InProcessWorker(model_dir)


@pytest.mark.parametrize("architecture", [{"convs": 2}, {"pool_first": True}], ids=["two-convs", "pool-first"])
@pytest.mark.parametrize("variant", ["eager", "fused", "onnx", "int8"])
def test_other_architectures_serve_in_every_exact_variant(variant, architecture, tmp_path, mnist_test_images,
                                                          mnist_pngs):
    # Net(convs=2) and Net(pool_first) go through the same archive and handler; fused folds every batch norm
    # (an untrained pool-first batch norm scales by a positive factor: it folds across the pool).
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", model=dataclasses.replace(TINY_MODEL, **architecture))
    model_dir = unpack(build_archive(checkpoint, tmp_path / "store", "mnist", "1.0", variant).path, tmp_path / "model")
    if variant == "int8":  # an untrained model's int8 answers are noise (the self-check refuses to serve such a
        # file: test_a_variant_that_answers_unlike_fp32_is_refused_at_load); here: its weights fit in 7 bits
        from training.tools.export import int8_weight_bound

        assert int8_weight_bound(model_dir / ONNX_FILES["int8"]) <= 64
        return
    worker = InProcessWorker(model_dir)
    images, _ = mnist_test_images
    expected = offline_probabilities(checkpoint, images[:64])
    answers = worker.answers(mnist_pngs[:64])
    assert [a["digit"] for a in answers] == expected.argmax(1).tolist()
    for answer, probabilities in zip(answers, expected, strict=True):
        assert list(answer["probabilities"].values()) == pytest.approx(probabilities.tolist(), abs=1e-4)
    if variant == "fused":
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in worker.handler.model.modules())


def test_auto_serves_an_exact_variant_chosen_at_start_and_reports_it(tmp_path, mnist_test_images, mnist_pngs, caplog):
    """The archive's default: the worker times the exact candidates on this host (no timing asserted
    here) and serves one of them; its answers are the fp32 model's; the log and the metrics name it."""
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    model_dir = unpack(build_archive(checkpoint, tmp_path / "store", "mnist", "1.0").path, tmp_path / "model")
    assert json.loads((model_dir / "model.json").read_text())["variant"] == "auto"
    with caplog.at_level(logging.INFO):
        worker = InProcessWorker(model_dir)
    assert worker.handler.served.variant in ("fused", "onnx")
    assert set(worker.handler.served.auto_ms) == {"fused", "onnx"}  # both equal fp32 on the 512 self-check digits
    assert f"auto: serving {worker.handler.served.variant} (median ms per batch of 32: fused " in caplog.text
    images, _ = mnist_test_images
    answers = worker.answers(mnist_pngs[:64])
    assert [a["digit"] for a in answers] == offline_probabilities(checkpoint, images[:64]).argmax(1).tolist()


def test_auto_leaves_out_a_candidate_that_answers_unlike_fp32(tmp_path):
    """Another network's file planted as the onnx candidate: auto must not serve it, however fast."""
    from training.tools.export import export_all

    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    model_dir = unpack(build_archive(checkpoint, tmp_path / "store", "mnist", "1.0", "auto").path, tmp_path / "model")
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    export_all(other, tmp_path / "other", ("onnx",), None, log=lambda _: None)
    shutil.copyfile(tmp_path / "other" / "model.onnx", model_dir / ONNX_FILES["auto"])
    worker = InProcessWorker(model_dir)
    assert (worker.handler.served.variant, set(worker.handler.served.auto_ms)) == ("fused", {"fused"})


def test_an_archive_without_a_variant_gets_the_one_default(tiny_archive, tmp_path):
    model_dir = unpack(tiny_archive[1].path, tmp_path / "model")
    meta = json.loads((model_dir / "model.json").read_text())
    del meta["variant"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    worker = InProcessWorker(model_dir)
    assert DEFAULT_VARIANT == "fused"
    # fused folds each batch norm into its conv (serving/worker/handler.py: optimize)
    assert [type(block[1]).__name__ for block in worker.handler.model.features] == ["Identity", "Identity"]


def test_cpu_only_variants_stay_on_the_cpu_and_bf16_falls_back_where_slower(monkeypatch):
    from serving.worker import variants

    assert variants.runnable_variant("int8", torch.device("cuda", 0)) == (
        "int8", torch.device("cpu"), "variant int8 runs on the CPU only")
    assert variants.runnable_variant("bf16", torch.device("cuda", 0)) == ("bf16", torch.device("cuda", 0), "")
    monkeypatch.setattr(variants.precision, "use_cpu_bf16", lambda train=True, config=None: False)
    assert variants.runnable_variant("bf16", torch.device("cpu")) == (
        "fused", torch.device("cpu"), "bf16 is not faster than fp32 on this CPU: serving fused (fp32)")
    monkeypatch.setattr(variants.precision, "use_cpu_bf16", lambda train=True, config=None: True)
    assert variants.runnable_variant("bf16", torch.device("cpu")) == ("bf16", torch.device("cpu"), "")


def test_bf16_variant_takes_and_returns_fp32():
    from serving.worker.variants import serving_model, to_model_input
    from training.core.model import Net

    torch.manual_seed(0)
    model = serving_model(Net(), "bf16")
    with torch.inference_mode():
        out = model(to_model_input(torch.zeros(3, 28, 28, dtype=torch.uint8)))
    assert out.dtype == torch.float32 and out.shape == (3, 10)


@pytest.mark.slow
def test_torchserve_never_makes_a_variant_that_fails_its_self_check_ready(trained_checkpoint, tmp_path, monkeypatch):
    """End to end: a signed archive whose int8 file answers unlike fp32 (another network's, planted where
    `make archive` writes it) is refused by every worker TorchServe starts, with the figure in its log."""
    from serving import archive as archive_module
    from serving.server import ServerError, TorchServe
    from training.tools.export import export_all

    export_all(save_tiny_checkpoint(tmp_path / "tiny.pt"), tmp_path / "tiny", ("onnx",), None, log=lambda _: None)
    monkeypatch.setattr(archive_module, "_export_variant", lambda checkpoint, variant, extra: shutil.copyfile(
        tmp_path / "tiny" / "model.onnx", extra / ONNX_FILES[variant]))
    store = tmp_path / "store"
    build_archive(trained_checkpoint, store, "mnist", "1.0", "int8")
    ts = TorchServe.on_free_ports(tmp_path / "run", store, model_name="mnist", auth=True)
    with pytest.raises(ServerError, match=r"^the model's workers refuse to serve it: variant int8 agrees with the fp32 "
                       r"model on \d+ of 512 self-check digits \(.*\): refusing to serve it on this CPU"):
        ts.start(timeout=180)
    assert ts.running_pid() is None
