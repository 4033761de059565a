"""The loop end to end on a real TorchServe: answers on the page's backend, corrections stored, a
fine-tuned candidate, signed as 2.0, deployed beside 1.0, compared over HTTP, promoted only on GO."""

from __future__ import annotations

import http.client
import json

import pytest

from serving import lifecycle
from serving.archive import build_archive
from serving.compare import compare
from serving.feedback.service import FeedbackService, RateLimiter
from serving.page import PageServer
from serving.server import TorchServe
from training.data import load_split
from training.feedback.store import FeedbackStore
from training.feedback.style import user_set
from training.recipes.finetune import FinetuneOptions, finetune
from training.recipes.finetune_report import compare as finetune_compare

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import encode_png  # noqa: E402

CORRECTIONS = 24


def page_post(page: PageServer, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
    host = f"127.0.0.1:{page.server_address[1]}"
    conn = http.client.HTTPConnection(*page.server_address[:2], timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": content_type, "Host": host, "Origin": f"http://{host}",
                                          "Sec-Fetch-Site": "same-origin"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_corrections_become_a_signed_compared_version_promoted_only_on_go(trained_checkpoint, mnist_dir,
                                                                            tmp_path):
    store_dir = tmp_path / "store"
    build_archive(trained_checkpoint, store_dir, "mnist", "1.0")
    server = TorchServe.on_free_ports(tmp_path / "run", store_dir, extra_properties={"enable_model_api": "true"})
    server.start(timeout=180)
    feedback = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    page = PageServer(server, quiet=True, feedback=FeedbackService(feedback, RateLimiter(per_minute=600, burst=100)))
    page.serve_in_thread()
    try:
        images, labels = load_split(str(mnist_dir), train=False)
        styled, truth, _ = user_set(images[:CORRECTIONS].numpy(), labels[:CORRECTIONS].numpy())
        for image, label in zip(styled, truth, strict=True):  # what the page does: predict, then correct
            status, answer = page_post(page, "/api/predict", encode_png(image), "image/png")
            assert status == 200 and answer["id"], answer
            status, stored = page_post(page, "/api/feedback", json.dumps({"id": answer["id"], "label": int(label)})
                                       .encode(), "application/json")
            assert status == 201, stored
        rows = feedback.rows()
        assert len(rows) == CORRECTIONS and {r.model_version for r in rows} == {"1.0"}

        out = tmp_path / "finetune"
        finetune(trained_checkpoint, rows, out, FinetuneOptions(epochs=1, holdout=0.25), str(mnist_dir), "cpu",
                 base_version="1.0", dry_run=True)
        build_archive(out / "model.pt", store_dir, "mnist", "2.0")  # `make archive CHECKPOINT=... VERSION=2.0`
        assert lifecycle.deploy(server, store_dir, "2.0").startswith("deployed mnist 2.0")
        result = compare(server, "1.0", "2.0", limit=100)  # `make compare A=1.0 B=2.0 LIMIT=100`
        assert result.errors == {"1.0": {}, "2.0": {}} and len(result.answers["2.0"]) == 100

        report = finetune_compare(trained_checkpoint, out / "model.pt", feedback, str(mnist_dir))
        assert report["held_out_rows"] == CORRECTIONS // 4
        if report["go"]:  # `make finetune-report && make promote VERSION=2.0`
            assert lifecycle.promote(server, "2.0", store_dir).startswith("mnist 2.0 is the default")
        status, answer = page_post(page, "/api/predict", encode_png(styled[0]), "image/png")
        rows_after = len(feedback.rows())
        status, _ = page_post(page, "/api/feedback", json.dumps({"id": answer["id"], "label": "not a digit"})
                              .encode(), "application/json")
        assert status == 201 and len(feedback.rows()) == rows_after + 1
        assert feedback.rows()[-1].model_version == ("2.0" if report["go"] else "1.0")  # who answered
    finally:
        page.shutdown()
        page.server_close()
        feedback.close()
        assert server.stop()
