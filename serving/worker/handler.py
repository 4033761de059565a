"""TorchServe handler: request → 28×28 digit → batched CNN → JSON, with per-request 400s for bad input.

Both /predictions and /explanations reach `handle`: the frontend marks an explanation request with
the header `explain: True`, and those requests alone also get an Integrated Gradients map. Every
answer carries a calibrated confidence (logits / the archive's temperature) and `is_digit`, the
"not a digit" verdict of the archive's OOD detector.

The model, the preprocessing, the OOD score and the explainer are the served core itself
(training/core/), packed into the `.mar` with this folder (serving/worker/): the lifecycle is
TorchServe's BaseHandler (initialize → handle); request parsing, variants, the v2 protocol and the model
itself (served.py, which the KServe predictor loads from the archive too) are
the modules beside this one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

# Serve the code the archive was built with, even where another `training` is importable.
_HERE = Path(__file__).resolve().parent
if (_HERE / "training").is_dir() and str(_HERE) not in sys.path[:1]:
    sys.path.insert(0, str(_HERE))

# oip: KServe v2 protocol; worker_io: buffered reads of the worker socket
from serving.worker import oip, worker_io  # noqa: E402
from serving.worker.metric_buffer import MetricBuffer, interval_from_env  # noqa: E402  (counters, gauges once a second)
from serving.worker.requests import (  # noqa: E402
    decode_request,
    error_body,
    prediction_body,
    wants_explanation,
)
from serving.worker.served import classify, load_served  # noqa: E402  (the model, as the KServe predictor runs it)
from serving.worker.variants import CPU_ONLY_VARIANTS, to_model_input  # noqa: E402
from training.core.explain import integrated_gradients  # noqa: E402
from training.core.inputs.preprocess import PreprocessError  # noqa: E402

logger = logging.getLogger(__name__)

# Answers below this top-class probability count as low confidence (configs/alerts.yml watches their share).
# Training uses label smoothing 0.1, so even sure answers sit near 0.9: 0.5 (the digit less likely than all
# others together) flags 0.9% of the MNIST test digits for the default model.
LOW_CONFIDENCE = 0.5


class MNISTHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties.get("model_dir") or _HERE)
        meta = json.loads((model_dir / "model.json").read_text())
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # library handles and stray allocations on this worker's GPU too
        if self.device.type == "cpu" or meta.get("variant") in CPU_ONLY_VARIANTS:
            # One intra-op thread per worker: TorchServe scales with workers and batches; several
            # threads per worker would fight the other workers and the Java frontend for the cores.
            torch.set_num_threads(int(os.environ.get("MNIST_WORKER_THREADS", "1")))
        serialized = (context.manifest or {}).get("model", {}).get("serializedFile", "weights.pt")
        # served.py: what the KServe predictor loads too (auto: timed on batches of the worker's batch size)
        served = load_served(model_dir, self.device, serialized, int(properties.get("batch_size") or 1))
        self.served, self.device, variant = served, served.device, served.variant
        self.model, self.explainer, self.detector = served.model, served.explainer, served.detector
        self.classes = served.classes
        self.batch_size = int(properties.get("batch_size") or 1)
        with torch.inference_mode():  # warm-up: first-call allocations happen here, not on a request
            self.model(to_model_input(torch.zeros(self.batch_size, 28, 28, dtype=torch.uint8), self.device))
        archived = (context.manifest or {}).get("model", {})
        self.model_id = (archived.get("modelName", "mnist"), archived.get("modelVersion", ""))
        # Every answer names the version that computed it (header X-Model-Version), so answers during a
        # rollout can be attributed; the metrics carry it too.
        self.version = str(archived.get("modelVersion", ""))
        context.metrics.add_counter("mnist_worker_loads_total", 1, None, [Dimension("ModelVersion", self.version)])
        # Which variant this worker serves (auto: the one it chose): `make status` reads this gauge.
        context.metrics.add_metric("mnist_worker_variant", 1, "count", None,
                                   [Dimension("ModelVersion", self.version), Dimension("Variant", variant)],
                                   MetricTypes.GAUGE)
        # ... and the explainer's first call (Captum's import, autograd's set-up) here too.
        integrated_gradients(self.explainer, to_model_input(torch.zeros(1, 28, 28, dtype=torch.uint8), self.device),
                             torch.zeros(1, dtype=torch.long, device=self.device))
        self.context = context
        # Counters and gauges are summed/kept and emitted at most once per interval, not per batch
        # (serving/worker/metric_buffer.py: each is a log line the frontend parses). 0: every batch.
        self.metric_buffer = MetricBuffer(self._emit_metric, interval_from_env())
        self.initialized = True
        worker_io.install()  # from the next message on: docs: Benchmarks (serving overhead)
        logger.info("MNIST model loaded on %s (variant %s, batch size %d)", self.device, variant, self.batch_size)

    def handle(self, data: list[dict[str, Any]], context) -> list[bytes]:
        """Decode each request on its own, run the good ones as one batch, answer each in order."""
        start = time.perf_counter()
        digits: list[np.ndarray] = []
        good: list[int] = []
        responses: list[bytes] = [b""] * len(data)
        v2: dict[int, dict] = {}  # KServe v2 requests of the batch: answered in that protocol (serving/worker/oip.py)
        for i, request in enumerate(data):
            try:
                if (body := oip.v2_body(request)) is not None:
                    v2[i] = body
                digits.append(oip.decode(body) if body is not None else decode_request(request))
                good.append(i)
            except PreprocessError as err:
                context.set_response_status(400, "Bad Request", i)
                in_v2 = i in v2 or isinstance(err, oip.V2RequestError)
                responses[i] = oip.error_body(str(err)) if in_v2 else error_body(str(err))
            except Exception:  # a decoding bug must fail only its own request, not the batch
                logger.exception("request %d of the batch could not be decoded", i)
                context.set_response_status(500, "Internal Server Error", i)
                responses[i] = oip.error_body("could not decode the request") if i in v2 else \
                    error_body("could not decode the request", 500)
            context.set_response_content_type(i, "application/json")
            context.set_response_header(i, "X-Model-Version", self.version)
        decoded = time.perf_counter()
        predicted: list[int] = []
        not_digit = 0
        low_confidence = 0
        explain_s = 0.0
        if digits:
            x = to_model_input(np.stack(digits), self.device)  # outside inference_mode: IG needs its gradients
            probabilities, digit_like = classify(self.served, x)
            predicted = probabilities.argmax(1).tolist()
            low_confidence = int((probabilities.max(1).values < LOW_CONFIDENCE).sum())
            inferred = time.perf_counter()
            try:
                maps = self._explain(context, good, x, predicted)
            except Exception:  # an explainer bug must fail only the explanations, not the batch's predictions
                logger.exception("Integrated Gradients failed for this batch")
                maps = {j: None for j, i in enumerate(good) if wants_explanation(context, i)}  # type: ignore[misc]
            explain_s = time.perf_counter() - inferred if maps else 0.0
            not_digit = int((~digit_like).sum())
            for j, (i, probs, ok) in enumerate(zip(good, probabilities.cpu().tolist(), digit_like.tolist(),
                                                   strict=True)):
                if j in maps and maps[j] is None:
                    context.set_response_status(500, "Internal Server Error", i)
                    responses[i] = error_body("could not explain the request", 500)
                elif i in v2:
                    responses[i] = oip.response_body(v2[i], probs, self.classes, ok, *self.model_id,
                                                     context.get_request_id(i))
                else:
                    responses[i] = prediction_body(probs, self.classes, ok, maps.get(j))
        inference_s = time.perf_counter() - decoded - explain_s
        self._record_metrics(context, decoded - start, inference_s, rejected=len(data) - len(good),
                             predicted=predicted, not_digit=not_digit, explain_s=explain_s,
                             low_confidence=low_confidence)
        return responses

    def _explain(self, context, good: list[int], x: torch.Tensor, predicted: list[int]) -> dict[int, list]:
        """Integrated Gradients maps for the /explanations requests among the batch's good ones, by position."""
        wanted = [j for j, i in enumerate(good) if wants_explanation(context, i)]
        if not wanted:
            return {}
        index = torch.tensor(wanted, device=x.device)
        target = torch.tensor([predicted[j] for j in wanted], device=x.device)
        with torch.enable_grad():
            maps = integrated_gradients(self.explainer, x[index], target)
        return {j: [[round(v, 6) for v in row] for row in m] for j, m in zip(wanted, maps.cpu().tolist(), strict=True)}

    def _record_metrics(self, context, preprocess_s: float, inference_s: float, rejected: int,
                        predicted: list[int], not_digit: int = 0, explain_s: float = 0.0,
                        low_confidence: int = 0) -> None:
        buffer = self.metric_buffer
        buffer.gauge("MNISTPreprocessTime", preprocess_s * 1000)
        if predicted:
            buffer.gauge("MNISTInferenceTime", inference_s * 1000)
        if explain_s:
            buffer.gauge("MNISTExplainTime", explain_s * 1000)
        buffer.count("MNISTRejectedRequests", rejected)
        version = (("ModelVersion", self.version),)
        buffer.count("mnist_low_confidence_predictions_total", low_confidence, version)
        buffer.count("mnist_not_a_digit_total", not_digit, version)  # answered, but not a digit (configs/alerts.yml)
        for digit in sorted(set(predicted)):
            buffer.count("MNISTPredictions", predicted.count(digit), (("Digit", self.classes[digit]), *version))
        buffer.flush_if_due()
        # The whole batch's time in the worker (decode + model), a histogram so Prometheus can take its
        # p99: every batch is a sample of its own, so it is not buffered.
        context.metrics.add_metric("mnist_handle_seconds", preprocess_s + inference_s, "s", None,
                                   [Dimension("ModelVersion", self.version)], MetricTypes.HISTOGRAM)

    def _emit_metric(self, kind: str, name: str, value, unit: str, dimensions: tuple[tuple[str, str], ...]) -> None:
        # A new list each call: TorchServe appends its default dimensions to the list it is given.
        dims = [Dimension(n, v) for n, v in dimensions]
        if kind == "counter":
            self.context.metrics.add_counter(name, value, None, dims)
        else:
            self.context.metrics.add_time(name, value, None, unit, dims)
