"""serving/worker/worker_io.py: TorchServe's own frame parser reads the same messages through the buffer as
from the bare socket, whatever way the bytes arrive, and `install()` patches only a worker loop.
The live server reads through it in test_serving.py (the worker log says so)."""

from __future__ import annotations

import socket
import struct
import sys
import threading
import types

import pytest
from ts.protocol.otf_message_handler import retrieve_msg

from serving.worker import worker_io


def _field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def inference_frame(requests: list[tuple[str, dict[str, str], bytes]]) -> bytes:
    """TorchServe 0.12's frontend→worker inference message (ts/protocol/otf_message_handler.py)."""
    frame = b"I"
    for request_id, headers, body in requests:
        frame += _field(request_id.encode())
        for name, value in headers.items():
            frame += _field(name.encode()) + _field(value.encode())
        frame += struct.pack("!i", -1)  # end of headers
        frame += _field(b"body") + _field(b"application/octet-stream") + _field(body)
        frame += struct.pack("!i", -1)  # end of inputs
    return frame + struct.pack("!i", -1)  # end of batch


REQUESTS = [(f"req-{i}", {"Content-Type": "image/png", "Authorization": "Bearer x" * i}, bytes(range(i % 7)) * 300)
            for i in range(32)]


def _parse(sender: bytes, reader_of, chunk: int) -> tuple:
    ours, theirs = socket.socketpair()
    try:
        def send() -> None:
            for i in range(0, len(sender), chunk):
                theirs.sendall(sender[i : i + chunk])

        thread = threading.Thread(target=send)
        thread.start()
        reader = reader_of(ours)
        messages = (retrieve_msg(reader), retrieve_msg(reader))  # two frames back to back
        thread.join()
        return messages
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("chunk", [1, 5, 1000, 1 << 20])
def test_the_buffer_parses_what_the_bare_socket_parses(chunk):
    frames = inference_frame(REQUESTS) + inference_frame(REQUESTS[:3])
    bare = _parse(frames, lambda s: s, 1 << 20)
    buffered = _parse(frames, worker_io.BufferedSocket, chunk)
    assert buffered == bare
    assert [len(msg) for _, msg in buffered] == [32, 3]
    assert buffered[0][1][5]["parameters"][0]["value"] == REQUESTS[5][2]


def test_a_closed_frontend_ends_the_worker_as_before():
    ours, theirs = socket.socketpair()
    theirs.sendall(inference_frame(REQUESTS[:1])[:-3])  # cut inside the end-of-batch marker
    theirs.close()
    with pytest.raises(SystemExit) as exit_info:  # what TorchServe's parser does on b"": exit(0)
        retrieve_msg(worker_io.BufferedSocket(ours))
    assert exit_info.value.code == 0
    ours.close()


def test_install_patches_a_worker_loop_once_and_nothing_else(monkeypatch):
    monkeypatch.delenv("MNIST_BUFFERED_READS", raising=False)
    monkeypatch.delitem(sys.modules, "ts.model_service_worker", raising=False)
    assert worker_io.install() is False  # pytest is not a TorchServe worker
    seen = []
    fake = types.ModuleType("ts.model_service_worker")
    fake.TorchModelServiceWorker = object  # type: ignore[attr-defined]
    fake.retrieve_msg = lambda conn: seen.append(conn) or retrieve_msg(conn)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ts.model_service_worker", fake)
    monkeypatch.setenv("MNIST_BUFFERED_READS", "0")
    assert worker_io.install() is False
    monkeypatch.setenv("MNIST_BUFFERED_READS", "1")
    assert worker_io.install() is True
    patched = fake.retrieve_msg
    assert worker_io.install() is True and fake.retrieve_msg is patched  # not wrapped twice
    ours, theirs = socket.socketpair()
    theirs.sendall(inference_frame(REQUESTS[:2]) + inference_frame(REQUESTS[2:4]))  # one write, two frames
    first, second = patched(ours), patched(ours)
    assert [r["requestId"] for r in first[1] + second[1]] == [b"req-0", b"req-1", b"req-2", b"req-3"]
    assert len({id(conn) for conn in seen}) == 1 and isinstance(seen[0], worker_io.BufferedSocket)
    ours.close()
    theirs.close()
