"""The served model as both servers build and run it: an unpacked archive → model, explainer, detector.

TorchServe's handler (handler.py, beside this) and the KServe predictor (serving/predictor/) both
import this module from the archive they unpacked, so a digit gets the same answer from either:
the archive's variant on its device, calibrated probabilities (logits / temperature) and `is_digit`,
the verdict of the archive's OOD detector. Importing it needs no TorchServe and no KServe.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.worker import auto
from serving.worker.variants import (
    APPROXIMATE_VARIANTS,
    DEFAULT_VARIANT,
    ONNX_FILES,
    SELF_CHECK_FILE,
    SELF_CHECK_MIN_AGREEMENT,
    runnable_variant,
    serving_model,
    to_model_input,
)
from training.core import precision
from training.core.ensemble import load_ensemble
from training.core.model import build_model
from training.core.ood import features_and_logits, is_digit, ood_score
from training.core.precision import SelfCheckError
from training.core.runners import OnnxModel

logger = logging.getLogger(__name__)


@dataclass
class Served:
    model: Any  # what answers: the variant (a torch module, an ONNX runner, a bf16 wrapper, an ensemble)
    explainer: Any  # the differentiable fp32 model: Integrated Gradients, and features where `model` has none
    detector: dict | None  # the "not a digit" detector's settings and tensors (None: every answer is a digit)
    temperature: float
    classes: list[str]
    variant: str
    device: torch.device
    auto_ms: dict[str, float] = field(default_factory=dict)  # auto: median ms per batch of each exact candidate


def load_served(model_dir: Path, device: torch.device, serialized: str = "weights.pt",
                batch_size: int = 32) -> Served:
    """The model an unpacked archive describes (model.json, weights, ood.pt, ONNX files), ready to answer.
    Variant auto is resolved here, by timing the exact candidates on batches of `batch_size`.

    Raises SelfCheckError where an approximate variant does not answer as the fp32 model on this host."""
    meta = json.loads((model_dir / "model.json").read_text())
    state_dict = torch.load(model_dir / serialized, map_location="cpu", weights_only=True)
    variant, device, why = runnable_variant(meta.get("variant", DEFAULT_VARIANT), device, meta.get("model_config"))
    if why:
        logger.warning(why)
    auto_ms: dict[str, float] = {}
    if variant == auto.AUTO:
        variant, auto_ms = choose_variant(meta, state_dict, model_dir, batch_size)
    detector = None
    model: Any
    if "ensemble" in meta:  # N members, one batched forward, averaged probabilities: training/core/ensemble.py
        # bf16 wraps the whole ensemble (a copy: the explainer stays fp32); the grouped forward
        # batches the fused networks themselves, not bf16 wrappers of them.
        member_variant = "fused" if variant == "bf16" else variant
        ensemble = load_ensemble(state_dict, meta, lambda m: serving_model(m, member_variant)).to(device)
        explainer = ensemble  # differentiable: Integrated Gradients of the averaged answer
        model = precision.BF16Model(copy.deepcopy(ensemble)) if variant == "bf16" else ensemble
    else:
        network = build_model(meta["model_config"])
        network.load_state_dict(state_dict)
        # Quantised layers (int8-legacy) have no backward, ONNX runners no autograd at all, and bf16
        # wraps the network: explanations and the "not a digit" features then use the float model.
        wrapped = variant in ONNX_FILES or variant in ("int8-legacy", "bf16")
        float_model = build_model(meta["model_config"]) if wrapped else None
        if float_model is not None:
            float_model.load_state_dict(state_dict)
        if variant in ONNX_FILES:
            model = OnnxModel(model_dir / ONNX_FILES[variant], torch.get_num_threads(),
                              use_features=variant == "onnx")  # training/core/runners.py
        else:
            model = serving_model(network, variant, device)
        explainer = model if float_model is None else serving_model(float_model, "eager", device)
        if "ood" in meta and (model_dir / "ood.pt").is_file():
            tensors = torch.load(model_dir / "ood.pt", map_location=device, weights_only=True)
            detector = {**meta["ood"], **tensors}
    if detector is None:
        logger.warning("archive has no OOD detector: every answer says is_digit true")
    served = Served(model, explainer, detector, float(meta.get("temperature", 1.0)), meta["class_names"],
                    variant, device, auto_ms)
    if variant in APPROXIMATE_VARIANTS and explainer is not model:
        self_check(served, model_dir / SELF_CHECK_FILE)
    return served


def choose_variant(meta: dict, state_dict: dict, model_dir: Path, batch_size: int) -> tuple[str, dict[str, float]]:
    """auto: the fastest of auto.AUTO_CANDIDATES that answers exactly as fp32 on the self-check digits."""
    network = build_model(meta["model_config"])
    network.load_state_dict(state_dict)
    reference = serving_model(network, "eager")
    candidates: dict[str, Any] = {"fused": serving_model(copy.deepcopy(reference), "fused")}
    if (model_dir / ONNX_FILES["onnx"]).is_file():
        candidates["onnx"] = OnnxModel(model_dir / ONNX_FILES["onnx"], torch.get_num_threads())
    if not (model_dir / SELF_CHECK_FILE).is_file():
        raise SelfCheckError(f"variant auto: the archive has no {SELF_CHECK_FILE} to compare the candidates "
                             "with fp32 on: rebuild it with `make archive`")
    digits = to_model_input(np.load(model_dir / SELF_CHECK_FILE))
    return auto.choose_fastest(candidates, reference, digits, batch_size)


def self_check(served: Served, path: Path) -> None:
    """Refuse to serve the variant unless it gives the fp32 model's answers on the packed digits (one line)."""
    variant = served.variant
    if not path.is_file():
        raise SelfCheckError(f"variant {variant}: the archive has no {SELF_CHECK_FILE} for its load-time "
                             "self-check: rebuild it with `make archive`")
    agree, total = precision.agreement(served.model, served.explainer, to_model_input(np.load(path), served.device))
    line = (f"variant {variant} agrees with the fp32 model on {agree} of {total} self-check digits "
            f"({agree / total:.1%}; needs {SELF_CHECK_MIN_AGREEMENT:.0%})")
    if agree < SELF_CHECK_MIN_AGREEMENT * total:
        raise SelfCheckError(f"{line}: refusing to serve it on this CPU ({precision.cpu_isa()}); "
                             "archive another variant (e.g. fused)")
    logger.info(line)


def classify(served: Served, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A model-input batch → (calibrated probabilities N×10, is_digit N), in one pass where the model allows."""
    model, detector = served.model, served.detector
    with torch.inference_mode():
        if hasattr(model, "features"):  # the CNN itself: one pass gives both
            features, logits = features_and_logits(model, x)
        elif getattr(model, "has_features", False) and detector is not None:  # ONNX with both
            features, logits = model.features_and_logits(x)
        else:  # older ONNX, bf16, an ensemble: logits only; the detector reads the float model's features
            logits = model(x)
            features = features_and_logits(served.explainer, x)[0] if detector is not None else logits
        probabilities = torch.softmax(logits.float() / served.temperature, dim=1)
        digit_like = (is_digit(detector, ood_score(detector, features, logits))
                      if detector is not None else torch.ones(len(x), dtype=torch.bool))
    return probabilities, digit_like
