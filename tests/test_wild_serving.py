"""End to end: what browsers and phones send, posted to a real TorchServe serving the session's trained model.

The server fixture is test_serving.py's (free loopback ports, token auth, checked shutdown). Every
picture is MNIST test image 0, a clear 7, sent in one of the forms of issue 12.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from training.core.inputs.decode import ORIENTATION_TAG
from training.tools.wild import on_paper, pen_strokes, png, shaded_photo, unorient, upscale

pytest.register_assert_rewrite("serving_fixtures", "test_serving")
pytest_plugins = ["serving_fixtures"]
import test_serving  # noqa: E402
from test_serving import json_body, predict  # noqa: E402

live_server = test_serving.server  # test_serving.py's TorchServe fixture: one server for this module too


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[ORIENTATION_TAG] = orientation
    return tags.tobytes()


def pil_bytes(image: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def forms(mnist_test_images) -> dict[str, tuple[bytes, str]]:
    image = mnist_test_images[0][0].numpy()
    page = on_paper(upscale(image, 280))  # black pen on white, 280×280
    text = base64.b64encode(png(page)).decode()
    turned = unorient(page, 3)  # a phone held upside down: the sensor stores the picture turned
    return {
        "data URL": json_body({"data": "data:image/png;base64," + text}),
        "wrapped base64": json_body({"data": "\n".join(text[i : i + 76] for i in range(0, len(text), 76))}),
        "EXIF-rotated JPEG": (pil_bytes(turned, "JPEG", quality=90, exif=exif(3)), "image/jpeg"),
        "MPO": (pil_bytes(turned, "MPO", quality=90, exif=exif(3), save_all=True,
                          append_images=[Image.fromarray(255 - page)]), "image/jpeg"),
        "HEIC": (pil_bytes(page, "HEIF", quality=80), "image/heic"),
        "thin-stroke canvas": (png(on_paper(pen_strokes(image, 400, 2))), "image/png"),
        "shaded photo": (shaded_photo(image, np.random.default_rng(12))["body"], "image/jpeg"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["data URL", "wrapped base64", "EXIF-rotated JPEG", "MPO", "HEIC",
                                  "thin-stroke canvas", "shaded photo"])
def test_what_clients_send_is_read_as_the_digit(live_server, forms, mnist_test_images, name):
    assert mnist_test_images[1][0] == 7
    body, content_type = forms[name]
    status, answer, _ = predict(live_server, body, content_type)
    assert (status, answer.get("digit")) == (200, 7), answer


@pytest.mark.slow
def test_the_turned_jpeg_without_its_exif_tag_is_not_read_as_the_digit(live_server, forms):
    # The control for the EXIF case: the same pixels without the tag are an upside-down 7.
    turned = np.asarray(Image.open(io.BytesIO(forms["EXIF-rotated JPEG"][0])))
    status, answer, _ = predict(live_server, pil_bytes(turned, "JPEG", quality=90), "image/jpeg")
    assert status == 200 and answer["digit"] != 7


@pytest.mark.slow
@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 50_000, "JSON nested too deeply: at most 32 levels"),
    (json.dumps({"data": "data:text/plain;base64,aGVsbG8="}).encode(), "'data' URL is not an image: text/plain"),
])
def test_deep_json_and_a_non_image_data_url_are_a_400_with_a_message(live_server, body, message):
    status, answer, _ = predict(live_server, body, "application/json")
    assert (status, answer) == (400, {"code": 400, "type": "InvalidInput", "message": message})
