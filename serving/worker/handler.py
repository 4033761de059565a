"""TorchServe handler: request → 28×28 digit → batched CNN → JSON, with per-request 400s for bad input.

Both /predictions and /explanations reach `handle`: the frontend marks an explanation request with
the header `explain: True`, and those requests alone also get an Integrated Gradients map. Every
answer carries a calibrated confidence (logits / the archive's temperature) and `is_digit`, the
"not a digit" verdict of the archive's OOD detector.

The model, the preprocessing, the OOD score and the explainer are the served core itself
(training/core/), packed into the `.mar` with this folder (serving/worker/): the lifecycle is
TorchServe's BaseHandler (initialize → handle); request parsing, variants and the v2 protocol are
the modules beside this one.
"""

from __future__ import annotations

import copy
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

from serving.worker import oip, worker_io  # noqa: E402  (KServe v2 protocol; buffered reads of the worker socket)
from serving.worker.metric_buffer import MetricBuffer, interval_from_env  # noqa: E402  (counters, gauges once a second)
from serving.worker.requests import (  # noqa: E402
    decode_request,
    error_body,
    prediction_body,
    wants_explanation,
)
from serving.worker.variants import (  # noqa: E402
    APPROXIMATE_VARIANTS,
    CPU_ONLY_VARIANTS,
    DEFAULT_VARIANT,
    ONNX_FILES,
    SELF_CHECK_FILE,
    SELF_CHECK_MIN_AGREEMENT,
    runnable_variant,
    serving_model,
    to_model_input,
)
from training.core import precision  # noqa: E402
from training.core.ensemble import load_ensemble  # noqa: E402
from training.core.explain import integrated_gradients  # noqa: E402
from training.core.inputs.preprocess import PreprocessError  # noqa: E402
from training.core.model import build_model  # noqa: E402
from training.core.ood import features_and_logits, is_digit, ood_score  # noqa: E402
from training.core.precision import SelfCheckError  # noqa: E402  (TorchServe: one class per handler module)
from training.core.runners import OnnxModel  # noqa: E402  (TorchServe: one class per handler module)

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
        state_dict = torch.load(model_dir / serialized, map_location="cpu", weights_only=True)
        variant, self.device, why = runnable_variant(meta.get("variant", DEFAULT_VARIANT), self.device)
        if why:
            logger.warning(why)
        self.temperature = float(meta.get("temperature", 1.0))
        self.detector = None
        if "ensemble" in meta:  # N members, one batched forward, averaged probabilities: training/core/ensemble.py
            # bf16 wraps the whole ensemble (a copy: the explainer stays fp32); the grouped forward
            # batches the fused networks themselves, not bf16 wrappers of them.
            member_variant = "fused" if variant == "bf16" else variant
            ensemble = load_ensemble(state_dict, meta, lambda m: serving_model(m, member_variant)).to(self.device)
            self.explainer = ensemble  # differentiable: Integrated Gradients of the averaged answer
            self.model = precision.BF16Model(copy.deepcopy(ensemble)) if variant == "bf16" else ensemble
        else:
            model = build_model(meta["model_config"])
            model.load_state_dict(state_dict)
            # Quantised layers (int8-legacy) have no backward, ONNX runners no autograd at all, and bf16
            # wraps the network: explanations and the "not a digit" features then use the float model.
            wrapped = variant in ONNX_FILES or variant in ("int8-legacy", "bf16")
            float_model = build_model(meta["model_config"]) if wrapped else None
            if float_model is not None:
                float_model.load_state_dict(state_dict)
            if variant in ONNX_FILES:
                self.model = OnnxModel(model_dir / ONNX_FILES[variant], torch.get_num_threads(),
                                       use_features=variant == "onnx")  # training/core/runners.py
            else:
                self.model = serving_model(model, variant, self.device)
            self.explainer = self.model if float_model is None else serving_model(float_model, "eager", self.device)
            if "ood" in meta and (model_dir / "ood.pt").is_file():
                tensors = torch.load(model_dir / "ood.pt", map_location=self.device, weights_only=True)
                self.detector = {**meta["ood"], **tensors}
        if self.detector is None:
            logger.warning("archive has no OOD detector: every answer says is_digit true")
        if variant in APPROXIMATE_VARIANTS and self.explainer is not self.model:
            self._self_check(variant, model_dir / SELF_CHECK_FILE)
        self.classes = meta["class_names"]
        self.batch_size = int(properties.get("batch_size") or 1)
        with torch.inference_mode():  # warm-up: first-call allocations happen here, not on a request
            self.model(to_model_input(torch.zeros(self.batch_size, 28, 28, dtype=torch.uint8), self.device))
        archived = (context.manifest or {}).get("model", {})
        self.model_id = (archived.get("modelName", "mnist"), archived.get("modelVersion", ""))
        # Every answer names the version that computed it (header X-Model-Version), so answers during a
        # rollout can be attributed; the metrics carry it too.
        self.version = str(archived.get("modelVersion", ""))
        context.metrics.add_counter("mnist_worker_loads_total", 1, None, [Dimension("ModelVersion", self.version)])
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

    def _self_check(self, variant: str, path: Path) -> None:
        """Refuse to serve `variant` unless it gives the fp32 model's answers on the packed digits (one line)."""
        if not path.is_file():
            raise SelfCheckError(f"variant {variant}: the archive has no {SELF_CHECK_FILE} for its load-time "
                                 "self-check: rebuild it with `make archive`")
        agree, total = precision.agreement(self.model, self.explainer, to_model_input(np.load(path), self.device))
        line = (f"variant {variant} agrees with the fp32 model on {agree} of {total} self-check digits "
                f"({agree / total:.1%}; needs {SELF_CHECK_MIN_AGREEMENT:.0%})")
        if agree < SELF_CHECK_MIN_AGREEMENT * total:
            raise SelfCheckError(f"{line}: refusing to serve it on this CPU ({precision.cpu_isa()}); "
                                 "archive another variant (e.g. fused)")
        logger.info(line)

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
            with torch.inference_mode():
                if hasattr(self.model, "features"):  # the CNN itself: one pass gives both
                    features, logits = features_and_logits(self.model, x)
                elif getattr(self.model, "has_features", False) and self.detector is not None:  # ONNX with both
                    features, logits = self.model.features_and_logits(x)
                else:  # older ONNX, bf16, an ensemble: logits only; the detector reads the float model's features
                    logits = self.model(x)
                    features = features_and_logits(self.explainer, x)[0] if self.detector is not None else logits
                probabilities = torch.softmax(logits.float() / self.temperature, dim=1)
                digit_like = (is_digit(self.detector, ood_score(self.detector, features, logits))
                              if self.detector is not None else torch.ones(len(digits), dtype=torch.bool))
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
                    responses[i] = oip.response_body(v2[i], probs, self.classes, *self.model_id,
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
