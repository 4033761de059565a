"""`make export`: every format loads back and answers like the eager model (training/tools/export.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.core.inputs.preprocess import normalize_array
from training.core.runners import FormatError
from training.tools.export import FILES, export_all, int8_weight_bound, load_runner, parity, predict_all, quantize_pt2e

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def test_slice(mnist_test_images) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test_images
    return normalize_array(images[:300].numpy()), labels[:300].numpy()


def test_onnx_and_pt2_exports_answer_like_the_eager_model(tmp_path, test_slice):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    x, y = test_slice
    written = export_all(checkpoint, tmp_path / "export", ("onnx", "pt2"), calibration=x[:64], log=lambda _: None)
    assert {k: p.name for k, p in written.items()} == {"onnx": "model.onnx", "pt2": "model.pt2"}
    reference = predict_all(load_runner(checkpoint), x)
    for name, path in written.items():
        result = parity(load_runner(path), reference, x, y)
        assert result.agreement == 1.0, name
        assert result.max_prob_diff < 1e-5, name
    onnx = load_runner(written["onnx"])  # dynamic batch: any batch size after export with batch 2
    assert [onnx(x[:n]).shape for n in (1, 7, 300)] == [(1, 10), (7, 10), (300, 10)]


def test_pt2e_quantizes_every_conv_and_linear_of_the_model(tmp_path, test_slice):
    """Static int8 of all four weight layers (the deprecated dynamic variant touched the two linears)."""
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(save_tiny_checkpoint(tmp_path / "model.pt")))
    quantized = quantize_pt2e(model, test_slice[0][:64])
    targets = [str(n.target) for n in quantized.graph.nodes if n.op == "call_function"]
    assert sum("dequantize_per_channel" in t for t in targets) == 4  # conv1, conv2, fc1, fc2 weights
    assert sum(t.startswith("aten.conv2d") for t in targets) == 2
    assert sum(t.startswith("aten.linear") for t in targets) == 2


def test_an_unknown_or_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="make export"):
        load_runner(tmp_path / "model.onnx")
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(FormatError, match="unknown model format"):
        load_runner(tmp_path / "model.tflite")


@pytest.mark.slow
def test_int8_onnx_of_a_trained_model_keeps_its_answers(trained_checkpoint, tmp_path, test_slice):
    x, y = test_slice
    written = export_all(trained_checkpoint, tmp_path, ("int8-onnx",), calibration=x[:256], log=lambda _: None)
    assert written["int8-onnx"].name == FILES["int8-onnx"]
    assert (tmp_path / FILES["onnx"]).is_file()  # the fp32 model it was quantised from
    reference = predict_all(load_runner(trained_checkpoint), x)
    result = parity(load_runner(written["int8-onnx"]), reference, x, y)
    assert result.agreement >= 0.99
    # Right on every x86 CPU by construction: 7-bit weights, so 255 * (|w1| + |w2|) <= 32640 fits the int16
    # pair sums of the kernels for CPUs without VNNI (ONNX Runtime cannot be capped to AVX2 to test it).
    assert int8_weight_bound(written["int8-onnx"]) <= 64
    with torch.no_grad():
        from training.checkpoint import load_checkpoint, model_from_checkpoint

        model = model_from_checkpoint(load_checkpoint(trained_checkpoint))
        pt2e = quantize_pt2e(model, x[:256])
        result = parity(lambda a: pt2e(torch.from_numpy(a)).numpy(), reference, x, y)
    assert result.agreement >= 0.99


@pytest.mark.slow
def test_aoti_packages_fp32_and_int8_agree_with_eager_at_any_batch_size(trained_checkpoint, tmp_path, test_slice):
    """AOTInductor compiles C++ (gcc): minutes on a busy 2-core box. int8 is compiled for a batch of 32."""
    x, y = test_slice
    written = export_all(trained_checkpoint, tmp_path, ("aoti", "int8"), calibration=x[:256], log=lambda _: None)
    reference = predict_all(load_runner(trained_checkpoint), x)
    assert parity(load_runner(written["aoti"]), reference, x, y).agreement == 1.0
    int8 = load_runner(written["int8"])
    assert parity(int8, reference, x, y).agreement >= 0.99
    assert [int8(x[:n]).shape for n in (1, 7, 40)] == [(1, 10), (7, 10), (40, 10)]  # padded, chunked
    assert np.array_equal(int8(x[:7]), int8(x[:32])[:7])
