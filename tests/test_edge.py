"""edge/: the torch-free client installs on its own, runs training's preprocessing, falls back to TorchServe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training.core.inputs.preprocess import normalize_array, preprocess_bytes
from training.core.runners import softmax
from training.tools.export import export_all, export_onnx, load_runner, onnx_temperature

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, SAMPLE_7, save_tiny_checkpoint  # noqa: E402

EDGE = ROOT / "edge"
# Runs the edge CLI from the source tree with torch made unimportable: proof that nothing on the
# edge path needs it, without an install.
NO_TORCH = "import sys; sys.modules['torch'] = None; from mnist_edge.cli import main; sys.exit(main(sys.argv[1:]))"


def run_edge(*args: str, python: str = sys.executable, source: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(EDGE)} if source else None
    return subprocess.run([python, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env, timeout=120)


def onnx_of(checkpoint: Path, out: Path) -> Path:
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    export_onnx(model_from_checkpoint(load_checkpoint(checkpoint)), out)
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("edge-tiny")
    checkpoint = save_tiny_checkpoint(base / "model.pt")
    return checkpoint, onnx_of(checkpoint, base / "model.onnx")


def test_the_edge_wheel_carries_the_served_input_path_itself(tmp_path):
    """No copy to drift: the wheel packs training/core/inputs/ as mnist_edge.inputs, byte for byte."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(EDGE)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("mnist_edge-*.whl")
    sources = sorted((ROOT / "training" / "core" / "inputs").glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "decode.py", "preprocess.py"}
    with zipfile.ZipFile(wheel) as z:
        for source in sources:
            assert z.read(f"mnist_edge/inputs/{source.name}") == source.read_bytes(), source.name


def sample_logits(checkpoint: Path) -> np.ndarray:
    """The eager (torch) model's logits for SAMPLE_7 through training's preprocessing."""
    return load_runner(checkpoint)(normalize_array(preprocess_bytes(SAMPLE_7.read_bytes())))[0]


def test_edge_predicts_without_torch_what_the_training_path_computes(tiny_onnx):
    checkpoint, model = tiny_onnx
    result = run_edge("predict", str(SAMPLE_7), "--model", str(model))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    expected = softmax(sample_logits(checkpoint)[None])[0]
    assert body["source"] == "edge"
    assert body["digit"] == int(expected.argmax())
    assert [body["probabilities"][str(d)] for d in range(10)] == pytest.approx(expected.tolist(), abs=1e-5)
    # export_onnx alone stores no temperature: the edge says it falls back to the raw softmax (T = 1).
    assert result.stderr == (f"note: {model} carries no temperature (exported from an uncalibrated checkpoint or "
                             "before `make export` stored one): the confidence is the raw softmax (T = 1), not the "
                             "calibrated one\n")


@pytest.fixture(scope="module")
def calibrated_onnx(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint with a fitted temperature, exported by `make export`'s own code."""
    from training.checkpoint import atomic_save, load_checkpoint

    base = tmp_path_factory.mktemp("edge-calibrated")
    checkpoint = save_tiny_checkpoint(base / "model.pt")
    atomic_save({**load_checkpoint(checkpoint), "temperature": TEMPERATURE}, checkpoint)
    written = export_all(checkpoint, base / "export", ("onnx",), calibration=None, log=lambda _: None)
    return checkpoint, written["onnx"]


# Far from 1 so that the calibrated and the raw softmax of an untrained tiny model differ visibly.
TEMPERATURE = 0.125


def test_export_stores_the_checkpoint_temperature_in_the_onnx_metadata(calibrated_onnx, tiny_onnx):
    assert onnx_temperature(calibrated_onnx[1]) == TEMPERATURE
    assert onnx_temperature(tiny_onnx[1]) is None


def test_export_says_when_the_checkpoint_has_no_temperature(tiny_onnx, tmp_path):
    lines: list[str] = []
    export_all(tiny_onnx[0], tmp_path, ("onnx",), calibration=None, log=lines.append)
    assert lines[0] == (f"note: {tiny_onnx[0]} has no fitted temperature, so its ONNX files carry none and the edge "
                        "client's confidence is the raw softmax (T = 1); `make calibrate "
                        f"CHECKPOINT={tiny_onnx[0]}` fits one")
    assert onnx_temperature(tmp_path / "model.onnx") is None


def test_edge_confidence_is_the_softmax_of_logits_over_the_stored_temperature(calibrated_onnx):
    checkpoint, model = calibrated_onnx
    result = run_edge("predict", str(SAMPLE_7), "--model", str(model))
    assert (result.returncode, result.stderr) == (0, "")
    body = json.loads(result.stdout)
    logits = sample_logits(checkpoint)
    calibrated, raw = softmax(logits[None] / TEMPERATURE)[0], softmax(logits[None])[0]
    assert [body["probabilities"][str(d)] for d in range(10)] == pytest.approx(calibrated.tolist(), abs=1e-5)
    assert body["confidence"] == pytest.approx(float(calibrated.max()), abs=1e-6)
    assert body["digit"] == int(calibrated.argmax()) == int(raw.argmax())  # T rescales, never reorders
    assert abs(body["confidence"] - float(raw.max())) > 1e-3  # so the check above could tell the two apart


def test_the_hybrid_threshold_compares_the_calibrated_confidence(calibrated_onnx):
    """Just above the calibrated confidence the edge asks the server; at it, it answers alone."""
    from serving.ports import free_port

    checkpoint, model = calibrated_onnx
    confidence = float(softmax(sample_logits(checkpoint)[None] / TEMPERATURE)[0].max())
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens: a forwarded image comes back marked
    for threshold, source in ((confidence - 1e-4, "edge"), (confidence + 1e-4, "edge (server failed)")):
        result = run_edge("predict", str(SAMPLE_7), "--model", str(model), "--server", server,
                          "--threshold", repr(threshold))
        assert json.loads(result.stdout)["source"] == source


@pytest.mark.parametrize(("value", "error"), [("0", "must be positive and finite"), ("-1", "must be positive"),
                                              ("inf", "must be positive"), ("hot", "is not a number")])
def test_a_broken_stored_temperature_is_refused(value, error):
    sys.path.insert(0, str(EDGE))
    try:
        from mnist_edge.cli import EdgeError, model_temperature
    finally:
        sys.path.remove(str(EDGE))
    assert model_temperature({"temperature": "0.5"}, "m.onnx") == (0.5, None)
    with pytest.raises(EdgeError, match=error):
        model_temperature({"temperature": value}, "m.onnx")


def test_edge_errors_are_one_line(tiny_onnx, tmp_path):
    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    result = run_edge("predict", str(tmp_path / "not-an-image.png"), "--model", str(tiny_onnx[1]))
    assert (result.returncode, result.stderr) == \
        (1, "error: not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes\n")
    result = run_edge("predict", str(SAMPLE_7), "--model", str(tmp_path / "missing.onnx"))
    assert result.returncode == 1 and result.stderr.startswith("error: no model at")


def test_an_unreachable_server_leaves_the_local_answer_marked(tiny_onnx):
    from serving.ports import free_port

    result = run_edge("predict", str(SAMPLE_7), "--model", str(tiny_onnx[1]), "--threshold", "1",
                      "--server", f"http://127.0.0.1:{free_port()}")
    body = json.loads(result.stdout)
    assert body["source"] == "edge (server failed)" and "unreachable" in body["server_error"]


@pytest.mark.slow
def test_edge_installs_in_a_fresh_venv_without_torch_and_reads_a_seven(trained_checkpoint, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run([env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--report", str(tmp_path / "report.json"), str(EDGE)], capture_output=True, text=True)
    if pip.returncode != 0 and "No matching distribution" in pip.stderr:
        pytest.skip(f"the package index is unreachable: {pip.stderr.strip()[-200:]}")
    assert pip.returncode == 0, pip.stderr
    installed = {item["metadata"]["name"].lower().replace("_", "-")  # PEP 503 names: pillow_heif is pillow-heif
                 for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"mnist-edge", "onnxruntime", "numpy", "opencv-python-headless", "pillow", "pillow-heif"} <= installed
    assert not {name for name in installed if "torch" in name}
    site = next((env_dir / "lib").glob("python*/site-packages"))
    for name in ("preprocess.py", "decode.py"):
        assert (site / "mnist_edge" / "inputs" / name).read_bytes() == \
            (ROOT / "training" / "core" / "inputs" / name).read_bytes()
    model = onnx_of(trained_checkpoint, tmp_path / "model.onnx")
    result = subprocess.run([env_dir / "bin" / "mnist-edge", "predict", str(SAMPLE_7), "--model", str(model)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digit"] == 7


@pytest.mark.slow
def test_hybrid_asks_the_server_below_the_threshold_and_answers_locally_above(trained_server, trained_checkpoint,
                                                                              tmp_path):
    # `make export`'s path: the ONNX file carries the trained checkpoint's fitted temperature.
    model = export_all(trained_checkpoint, tmp_path, ("onnx",), calibration=None, log=lambda _: None)["onnx"]
    url, token = trained_server.url("inference"), trained_server.token("inference")
    # "--token=T": a token may start with "-", which argparse would take for an option
    common = ("predict", str(SAMPLE_7), "--model", str(model), "--server", url, f"--token={token}")
    answered = run_edge(*common, "--threshold", "0")
    assert answered.stderr == ""  # no "carries no temperature" note
    local = json.loads(answered.stdout)
    status, served = trained_server.predict(SAMPLE_7.read_bytes())
    assert status == 200
    # Calibrated alike: the edge's softmax(logits / T) is the server's (archive temperature) to fp32 rounding.
    assert [local["probabilities"][str(d)] for d in range(10)] == \
        pytest.approx([served["probabilities"][str(d)] for d in range(10)], abs=1e-5)
    remote = run_edge(*common, "--threshold", "1")  # nothing is that sure: always asks
    assert remote.returncode == 0, remote.stderr
    body = json.loads(remote.stdout)
    assert (local["source"], body["source"]) == ("edge", "server")
    assert body["digit"] == served["digit"] == local["digit"] == 7
    assert body["probabilities"] == served["probabilities"]
    assert body["edge"] == {"digit": local["digit"], "confidence": local["confidence"]}
    refused = json.loads(run_edge(*common[:-1], "--token=wrong-token", "--threshold", "1").stdout)
    # TorchServe 0.12 answers a wrong token with 400 InvalidKeyException (not 401).
    assert refused["source"] == "edge (server failed)" and "InvalidKeyException" in refused["server_error"]


def test_the_hybrid_table_counts_each_path_on_known_answers():
    from bench.hybrid import REFUSED, hybrid_table

    confidence = np.array([0.99, 0.95, 0.6, 0.3, 0.0])
    local = np.array([1, 2, 3, 4, REFUSED])  # the last one the edge could not read
    labels = np.array([1, 2, 0, 4, 5])
    server = {0: 1, 1: 2, 2: 0, 3: 9, 4: 5}  # the server's answer for each image below the highest threshold
    rows = hybrid_table(confidence, local, server, labels, (0.5, 0.9, 1.0))
    assert rows == [
        {"threshold": 0.5, "local_share": 0.6, "local_accuracy": 2 / 3, "server_accuracy": 0.5, "forwarded": 2,
         "overall_accuracy": 0.6},
        {"threshold": 0.9, "local_share": 0.4, "local_accuracy": 1.0, "server_accuracy": 2 / 3, "forwarded": 3,
         "overall_accuracy": 0.8},
        {"threshold": 1.0, "local_share": 0.0, "local_accuracy": None, "server_accuracy": 0.8, "forwarded": 5,
         "overall_accuracy": 0.8},
    ]


def test_the_hybrid_bench_says_when_the_wild_set_is_absent(monkeypatch):
    from bench.hybrid import load_wild

    images, labels = np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 2])
    assert load_wild(images, labels, 0, 0) == (None, "wild set: left out (--wild-limit 0)")
    monkeypatch.setitem(sys.modules, "training.tools.wild", None)  # as in a tree without training/tools/wild.py
    wild, note = load_wild(images, labels, 3, 0)
    assert wild is None
    assert note.startswith("wild set: ABSENT (") and note.endswith("), so the table is MNIST only")
