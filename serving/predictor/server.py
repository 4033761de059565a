"""KServe's ModelServer, one process, bound to one host, every refusal in the v2 error shape.

KServe's ModelServer binds REST to 0.0.0.0 and gRPC to [::] with no option, and FastAPI answers a body it
cannot parse with a 422 in its own shape; here both servers bind `host` and every refusal is a 4xx (or a
500 where the server is at fault) with `{"error": "..."}`, as TorchServe's handler answers.
SIGTERM: uvicorn stops accepting, finishes the requests in flight (the grace period), then gRPC stops
with the same grace.
"""

from __future__ import annotations

import asyncio
import logging

import kserve
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import model_server
from kserve.errors import InferenceError
from kserve.logging import KSERVE_TRACE_LOGGER_NAME
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.rest.server import RESTServer
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class LoopbackGRPCServer(grpc_server.GRPCServer):
    """KServe's gRPC server on `host` instead of every interface."""

    def __init__(self, host: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = host

    async def start(self, max_workers: int) -> None:
        servicer = grpc_server.InferenceServicer(self._data_plane, self._model_repository_extension)
        options = [(f"grpc.{k}", self._kwargs.get(f"grpc_{k}")) for k in ("max_send_message_length",
                                                                      "max_receive_message_length")]
        self._server = grpc_server.aio.server(
            grpc_server.futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(grpc_server.LoggingInterceptor(), grpc_server.ExceptionToStatusInterceptor()),
            options=options)
        grpc_server.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._server.add_insecure_port(f"{host}:{self._port}")
        logger.info("gRPC on %s:%d", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


async def malformed_request(_request, exc: RequestValidationError) -> JSONResponse:
    """A body FastAPI cannot parse as a v2 request: 400 in the v2 error shape, as TorchServe's handler
    answers it (FastAPI's own answer is a 422 with its `detail` list)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return JSONResponse({"error": "malformed JSON body"}, status_code=400)
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    if not where:  # no JSON body at all (an image posted as the body, say)
        return JSONResponse({"error": "the body must be a v2 inference request: JSON with 'inputs'"},
                            status_code=400)
    return JSONResponse({"error": f"not a v2 inference request: {where}: {first.get('msg', 'invalid')}"},
                        status_code=400)


async def http_error(_request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (a body it cannot read, an unknown path) in the v2 error shape too."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def undecodable(_request, exc: InferenceError) -> JSONResponse:
    """kserve 0.21 turns binary BYTES of a REST request into text before the model sees them, so raw
    image bytes there are refused before the model sees them, as a 500: a 400 that says what to send."""
    if "using UTF-8" in str(exc):
        return JSONResponse({"error": "binary BYTES over REST must be UTF-8 text: send the image base64-encoded "
                             "(raw image bytes work over gRPC)"}, status_code=400)
    return JSONResponse({"error": str(exc)}, status_code=500)


class V2ErrorsRESTServer(RESTServer):
    """KServe's REST server, every refusal in the v2 error shape and a 4xx where the request is at fault.
    Added after KServe's own handlers, which would replace these (one handler per exception class)."""

    def create_application(self) -> None:
        super().create_application()
        model_server.app.add_exception_handler(RequestValidationError, malformed_request)
        model_server.app.add_exception_handler(HTTPException, http_error)
        model_server.app.add_exception_handler(InferenceError, undecodable)


class HostModelServer(kserve.ModelServer):
    """kserve.ModelServer, one process, REST and gRPC bound to `host`."""

    def __init__(self, host: str, request_logs: bool = False, **kwargs):
        super().__init__(enable_latency_logging=request_logs, **kwargs)
        self.host, self.request_logs = host, request_logs

    def start(self, models: list) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = V2ErrorsRESTServer(
            model_server.FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
            self.http_port, access_log_format=self.access_log_format, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        self._rest_server.config.host = self.host
        if not self.request_logs:  # uvicorn's access line and KServe's two timing lines, per request
            self._rest_server.config.access_log = False
            logging.getLogger(KSERVE_TRACE_LOGGER_NAME).setLevel(logging.WARNING)
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = LoopbackGRPCServer(self.host, self.grpc_port, self.dataplane,
                                                   self.model_repository_extension, kwargs=vars(model_server.args),
                                                   grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
