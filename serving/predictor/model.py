"""The MNIST model on KServe's Python SDK: a signed .mar in, Open Inference Protocol v2 answers out.

A thin shell over the archive's served core: `load` verifies the signature and imports the packed
code (archive.py), then builds the model exactly as TorchServe's handler does (serving/worker/served.py
from the archive); `preprocess` decodes one digit with the archive's v2 codec (serving/worker/oip.py),
`predict` answers it in a batch (batcher.py), `postprocess` writes the same outputs TorchServe's
handler sends. A bad request is kserve's InvalidInput: HTTP 400 `{"error": "..."}`, gRPC
INVALID_ARGUMENT, the v2 error shape TorchServe's handler uses too.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import kserve
import numpy as np
import torch
from kserve.errors import InferenceError, InvalidInput
from kserve.logging import logger  # KServe's logger: configured by its ModelServer, unlike this module's own
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from serving.predictor.archive import import_packed, unpack_verified
from serving.predictor.batcher import MicroBatcher


class MNISTPredictor(kserve.Model):
    def __init__(self, archive: Path, max_batch: int = 32, max_delay: float = 0.0, device: str = "cpu"):
        super().__init__(archive.stem)  # the archive's own model name replaces it at load
        self.archive, self.max_batch, self.max_delay = archive, max_batch, max_delay
        self.device = torch.device(device)
        self.version = ""
        self.oip: Any = None  # the archive's modules, imported at load
        self.variants: Any = None
        self.classify: Any = None
        self.ready = False

    def load(self) -> bool:
        """Verify, unpack, import, build, warm up; only then ready. PredictorError (one line) otherwise."""
        unpacked = unpack_verified(self.archive)
        logger.info("%s: signature by key %s verified (sha256 %s)", self.archive, unpacked.signature.signer,
                    unpacked.signature.sha256)
        modules = import_packed(unpacked.model_dir)
        self.oip, self.variants, self.classify = modules["oip"], modules["variants"], modules["served"].classify
        self.served = modules["served"].load_served(unpacked.model_dir, self.device)
        self.name, self.version = unpacked.name, unpacked.version
        self._answer([np.zeros((28, 28), dtype=np.uint8)] * self.max_batch)  # first-call allocations, not on a request
        self.batcher = MicroBatcher(self._answer, self.max_batch, self.max_delay)
        logger.info("model %s version %s loaded on %s (variant %s)", self.name, self.version, self.served.device,
                    self.served.variant)
        self.ready = True
        return self.ready

    def _answer(self, digits: list[np.ndarray]) -> list[tuple[list[float], bool]]:
        """A batch of 28×28 digits → (probabilities, is_digit) each: the handler's numbers (served.classify)."""
        x = self.variants.to_model_input(np.stack(digits), self.served.device)
        probabilities, digit_like = self.classify(self.served, x)
        return list(zip(probabilities.cpu().tolist(), digit_like.tolist(), strict=True))

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if not isinstance(payload, InferRequest):  # the v1 protocol ({"instances": ...}) is not served
            raise InvalidInput("send an Open Inference Protocol v2 request: POST /v2/models/<name>/infer")
        body = {"inputs": [{"name": t.name, "shape": list(t.shape), "datatype": t.datatype, "data": _data(t)}
                           for t in payload.inputs]}
        try:
            # No id sent: a fresh one, as TorchServe answers with its request id.
            return payload.id or str(uuid.uuid4()), self.oip.decode(body)
        except self.oip.PreprocessError as err:  # the archive's own class: its decode raised it
            raise InvalidInput(str(err)) from None

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        request_id, digit = payload
        return request_id, await self.batcher.submit(digit)

    async def postprocess(self, result: Any, headers: dict[str, str] | None = None) -> Any:
        request_id, (probabilities, digit_like) = result
        outputs = [InferOutput(o["name"], o["shape"], o["datatype"], o["data"])
                   for o in self.oip.outputs(probabilities, self.served.classes, digit_like)]
        return InferResponse(request_id, self.name, outputs, model_version=self.version)


def _data(tensor: Any) -> Any:
    """A request tensor's data as oip.decode reads it: JSON's list as sent; binary data (REST's extension,
    gRPC's raw contents) decoded by kserve into a list of the given shape (BYTES: the raw bytes)."""
    if isinstance(tensor.data, list) and tensor.data:
        return tensor.data
    try:
        return tensor.as_numpy().tolist()
    except (ValueError, TypeError, InferenceError) as err:
        raise InvalidInput(f"input {tensor.name!r}: {err}") from None
