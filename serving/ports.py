"""Addresses and ports: what `INFERENCE_ADDRESS=...` means, and whether a port is free."""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlsplit

from serving.errors import ServerError

DEFAULT_ADDRESSES = {"inference": "127.0.0.1:8080", "management": "127.0.0.1:8081", "metrics": "127.0.0.1:8082"}
# TorchServe also opens gRPC (on loopback); unused here, but its ports must be free and distinct per server.
DEFAULT_GRPC_PORTS = {"grpc_inference_port": 7070, "grpc_management_port": 7071}


def normalize_address(value: str, kind: str) -> str:
    """`host`, `host:port`, `[::1]:port` or a URL → `http://host:port` (the kind's default port if none)."""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path not in ("", "/"):
        raise ServerError(f"{kind.upper()}_ADDRESS={value!r} is not an address: use HOST:PORT, e.g. "
                          f"{DEFAULT_ADDRESSES[kind]} or [::1]:{DEFAULT_ADDRESSES[kind].rsplit(':', 1)[1]}")
    if port is None:
        port = int(DEFAULT_ADDRESSES[kind].rsplit(":", 1)[1])
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def address_from_env(kind: str) -> str:
    return normalize_address(os.environ.get(f"{kind.upper()}_ADDRESS") or DEFAULT_ADDRESSES[kind], kind)


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 0


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports. Each stays bound until all are picked: a port closed at once is free
    again, and the kernel may hand it out twice (two of a server's addresses on one port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
