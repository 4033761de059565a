"""Buffered reads for TorchServe 0.12's worker socket: one `recv` per chunk instead of per field.

The worker's frame parser (`ts/protocol/otf_message_handler.py`) reads every length, header name,
header value and body with its own `socket.recv`: 40-50 system calls per request, each with its
Python around it (docs: Benchmarks: "TorchServe protocol" was 30% of the worker's samples).
TorchServe 0.12.0 is the last release and its repository is archived, so the fix lives here: once
the handler is loaded, the worker's loop reads through `BufferedSocket`, which answers `recv(n)`
from one large read. The parser is unchanged: same frames, same fields, same errors (a closed
socket still reads as b"", which the parser treats as the frontend going away).

`install()` runs in `MNISTHandler.initialize`, i.e. inside the worker process, between two
messages: nothing is buffered yet at that point, so no byte can be lost or read twice. It patches
only a module that is TorchServe's worker loop (`retrieve_msg` beside `TorchModelServiceWorker`),
and only once; anywhere else (tests, `bench`, KServe's own wrapper) it does nothing.
`MNIST_BUFFERED_READS=0` leaves TorchServe as it is.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
READ_SIZE = 1 << 18  # a batch of 32 PNG requests with their headers is ~30 KiB


class BufferedSocket:
    """`recv(n)` from a buffer refilled by one `recv(READ_SIZE)`; everything else goes to the socket."""

    def __init__(self, sock: socket.socket, read_size: int = READ_SIZE) -> None:
        self._sock = sock
        self._read_size = read_size
        self._data = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._data):
            self._data, self._pos = self._sock.recv(max(n, self._read_size)), 0
            if not self._data:
                return b""  # closed: the parser exits as it would on the bare socket
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _worker_module() -> Any | None:
    for name in ("__main__", "ts.model_service_worker"):  # the frontend runs the worker as a script
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TorchModelServiceWorker") and callable(
                getattr(module, "retrieve_msg", None)):
            return module
    return None


def install() -> bool:
    """Make TorchServe's worker loop read through `BufferedSocket`; True when it now does."""
    if os.environ.get("MNIST_BUFFERED_READS", "1") == "0":
        return False
    module = _worker_module()
    if module is None:
        return False
    original: Callable = module.retrieve_msg
    if getattr(original, "buffered", False):
        return True
    reader: BufferedSocket | None = None

    def retrieve_msg(conn: socket.socket) -> Any:
        nonlocal reader
        if reader is None or reader._sock is not conn:  # one connection per worker; a new one, a new buffer
            reader = BufferedSocket(conn)
        return original(reader)

    retrieve_msg.buffered = True  # type: ignore[attr-defined]
    module.retrieve_msg = retrieve_msg
    logger.info("worker reads frames through a %d KiB buffer (serving/worker/worker_io.py)", READ_SIZE >> 10)
    return True
