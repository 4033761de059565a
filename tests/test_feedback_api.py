"""Feedback through its two front doors: the API for programs (a feedback key) and the page's own
/api/feedback. Every refusal is a clear 4xx JSON answer and stores nothing; floods and repeats are bounded."""

from __future__ import annotations

import base64
import http.client
import json

import numpy as np
import pytest

from serving.feedback.api import FeedbackServer
from serving.feedback.keys import FeedbackKeyError, add_key, key_name, read_keys
from serving.feedback.service import MAX_API_BODY, MAX_PAGE_BODY, FeedbackService, RateLimiter
from serving.page import PageServer
from serving.server import TorchServe, free_port
from training.core.inputs.preprocess import preprocess_bytes
from training.feedback.models import NOT_A_DIGIT
from training.feedback.store import FeedbackStore

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import SAMPLE_7  # noqa: E402

KEY = "k-" + "x" * 40


def request(server, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw)
    finally:
        conn.close()


def valid(**change) -> dict:
    body = {"image": base64.b64encode(SAMPLE_7.read_bytes()).decode(), "model_name": "mnist",
            "model_version": "1.0", "answer": 1, "confidence": 0.62, "is_digit": True, "label": 7}
    return {**body, **change}


@pytest.fixture
def api(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    server = FeedbackServer(FeedbackService(store, RateLimiter(per_minute=1, burst=3)), {"alice": KEY},
                            quiet=True, client_timeout=2)
    server.serve_in_thread()
    yield server
    server.shutdown()
    server.server_close()
    store.close()


def post(server, body, key: str | None = KEY, content_type="application/json", **headers):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {"Content-Type": content_type, **headers}
    if key is not None:
        head["Authorization"] = f"Bearer {key}"
    return request(server, "POST", "/feedback", data, head)


@pytest.mark.parametrize(("body", "change", "status", "kind", "words"), [
    (None, {"key": None}, 401, "client", "feedback key is required"),
    (None, {"key": "wrong"}, 401, "client", "feedback key is required"),
    (None, {"content_type": "text/plain"}, 415, "client", "application/json"),
    (b"{not json", {}, 400, "input", "one JSON object"),
    (b"[1, 2]", {}, 400, "input", "one JSON object"),
    (valid(label=11), {}, 400, "input", "label must be 0-9"),
    (valid(label="seven"), {}, 400, "input", "label must be 0-9"),
    (valid(label=True), {}, 400, "input", "label must be 0-9"),
    (valid(answer=12), {}, 400, "input", "answer must be 0-9"),
    (valid(confidence="high"), {}, 400, "input", "confidence must be a float"),
    (valid(model_version=""), {}, 400, "input", "model_version must be 1-64"),
    (valid(image="***"), {}, 400, "input", "image must be base64"),
    (valid(image=base64.b64encode(b"not a picture").decode()), {}, 400, "input", "image:"),
])
def test_bad_feedback_gets_a_clear_4xx_and_stores_nothing(api, body, change, status, kind, words):
    answer_status, answer = post(api, body if body is not None else valid(), **change)
    assert (answer_status, answer["kind"]) == (status, kind) and words in answer["error"]
    assert api.service.store.rows() == []


def test_a_huge_body_is_refused_before_it_is_read(api):
    status, answer = post(api, b"x", **{"Content-Length": str(MAX_API_BODY + 1)})
    assert (status, answer["kind"]) == (413, "input")
    assert api.service.store.rows() == []


def test_a_correction_is_stored_once_with_what_the_model_saw_then_floods_get_429(api):
    status, answer = post(api, valid())
    assert status == 201 and answer["stored"] is True
    assert post(api, valid()) == (200, {"id": answer["id"], "stored": False, "duplicate": True})
    row = api.service.store.rows()[0]
    seen = preprocess_bytes(SAMPLE_7.read_bytes())  # the handler's own preprocessing: the 28×28 it saw
    assert np.array_equal(np.frombuffer(row.image, np.uint8).reshape(28, 28), seen)
    assert (row.label, row.answer, row.model_version, row.source, row.raw_image) == (7, 1, "1.0", "alice", None)
    status, answer = post(api, valid(label="not a digit", keep_raw=True))  # the third of a burst of 3
    assert status == 201
    status, answer = post(api, valid(label=2))
    assert (status, answer["kind"]) == (429, "rate") and "too many corrections from alice" in answer["error"]
    rows = api.service.store.rows()
    assert [r.label for r in rows] == [7, NOT_A_DIGIT] and rows[1].raw_image == SAMPLE_7.read_bytes()
    status, metrics = request(api, "GET", "/metrics")
    text = metrics.decode()
    assert 'mnist_feedback_received_total{ModelName="mnist",ModelVersion="1.0"} 2' in text
    assert 'mnist_feedback_corrections_total{ModelName="mnist",ModelVersion="1.0"} 2' in text
    assert 'mnist_feedback_rejected_total{kind="rate"} 1' in text


def test_feedback_keys_are_private_named_and_compared_whole(tmp_path):
    secret = add_key("alice", tmp_path)
    assert (tmp_path / "feedback.keys").stat().st_mode & 0o777 == 0o600
    keys = read_keys(tmp_path)
    assert key_name(f"Bearer {secret}", keys) == "alice"
    assert key_name(f"Bearer {secret[:-1]}", keys) is None and key_name(secret, keys) is None
    with pytest.raises(FeedbackKeyError, match="key name"):
        add_key("page", tmp_path)
    (tmp_path / "feedback.keys").chmod(0o644)
    with pytest.raises(FeedbackKeyError, match="chmod 600"):
        read_keys(tmp_path)


@pytest.fixture
def page(tmp_path):
    nothing = f"http://127.0.0.1:{free_port()}"
    torchserve = TorchServe(run_dir=tmp_path, model_store=tmp_path, auth=False,
                            addresses={"inference": nothing, "management": nothing, "metrics": nothing})
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    server = PageServer(torchserve, quiet=True, feedback=FeedbackService(store))
    server.serve_in_thread()
    yield server
    server.shutdown()
    server.server_close()
    store.close()


def page_post(page, body, **headers):
    host = f"127.0.0.1:{page.server_address[1]}"
    head = {"Content-Type": "application/json", "Host": host, "Origin": f"http://{host}",
            "Sec-Fetch-Site": "same-origin", **headers}
    return request(page, "POST", "/api/feedback", json.dumps(body).encode(), head)


def test_the_page_corrects_an_answer_it_gave_by_id_and_refuses_other_sites(page):
    seen = preprocess_bytes(SAMPLE_7.read_bytes())
    answer_id = page.backend.recent.remember(seen, SAMPLE_7.read_bytes(), "mnist", "2.0",
                                             {"digit": 1, "confidence": 0.55, "is_digit": True})
    status, answer = page_post(page, {"id": answer_id, "label": 7}, Origin="http://evil.example")
    assert (status, answer["kind"]) == (403, "client")
    status, answer = page_post(page, {"id": answer_id, "label": 7}, **{"Content-Type": "text/plain"})
    assert status == 415  # a form or no-cors fetch from another site cannot send application/json
    status, answer = page_post(page, {"id": "forged", "label": 7})
    assert (status, answer["kind"]) == (400, "input") and "no recent answer" in answer["error"]
    status, answer = page_post(page, {"id": answer_id, "label": 42})
    assert status == 400
    status, answer = page_post(page, {"id": answer_id, "label": "x" * MAX_PAGE_BODY})
    assert status == 413
    assert page.feedback.store.rows() == []
    status, answer = page_post(page, {"id": answer_id, "label": 7})
    assert status == 201
    row = page.feedback.store.rows()[0]
    assert (row.source, row.model_version, row.answer, row.label, row.raw_image) == ("page", "2.0", 1, 7, None)
    assert row.image == seen.tobytes()


def test_a_database_that_fails_gets_a_503_not_a_dropped_connection(api):
    from sqlalchemy import text

    with api.service.store.engine.begin() as conn:  # as if a shared database lost its table
        conn.execute(text("DROP TABLE feedback"))
    status, answer = post(api, valid())
    assert (status, answer["kind"]) == (503, "down") and "not answering" in answer["error"]
