"""A client for a running TorchServe: its addresses, its bearer tokens and plain HTTP calls.

`serving.server.TorchServe` adds the lifecycle (start, wait, stop) on top of this; the CLI's
`predict`, `status` and `token` only need this part.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from serving.errors import ServerError
from serving.ports import DEFAULT_ADDRESSES, address_from_env

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerClient:
    run_dir: Path = field(default_factory=lambda: Path(os.environ.get("SERVE_DIR", ROOT / "logs")))
    model_name: str = "mnist"
    auth: bool = True
    addresses: dict[str, str] = field(default_factory=lambda: {k: address_from_env(k) for k in DEFAULT_ADDRESSES})

    def url(self, kind: str, path: str = "") -> str:
        return self.addresses[kind] + path

    def token(self, kind: str) -> str | None:
        """The bearer key for `inference` or `management` calls (None when auth is off).

        TorchServe's keys expire (60 minutes by default); an expired one is renewed with the API
        key, which rewrites the key file, so a long-running server keeps answering `make predict`.
        """
        if not self.auth:
            return None
        keys = self._read_keys()
        if kind not in keys:
            raise ServerError(f"no {kind} key in {self.run_dir / 'key_file.json'}")
        expires = keys[kind].get("expiration time", "")
        if expires and datetime.fromisoformat(expires[:19]).replace(tzinfo=timezone.utc) < \
                datetime.now(timezone.utc) + timedelta(seconds=30):
            req = urllib.request.Request(self.url("management", f"/token?type={kind}"),
                                         headers={"Authorization": f"Bearer {keys['API']['key']}"})
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except (urllib.error.URLError, OSError) as err:
                raise ServerError(f"the {kind} key expired and could not be renewed: {err}") from None
            keys = self._read_keys()
        return keys[kind]["key"]

    def _read_keys(self) -> dict[str, Any]:
        path = self.run_dir / "key_file.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise ServerError(f"no token file at {path}: is the server running (`make serve`)?") from None

    def request(self, kind: str, path: str, data: bytes | None = None, method: str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10,
                response_headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body); `response_headers`, where given, receives the answer's headers."""
        headers = dict(headers or {})
        token_kind = "management" if kind == "management" else "inference"
        if kind != "metrics" and (key := self.token(token_kind)):
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url(kind, path), data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if response_headers is not None:
                    response_headers.update(resp.headers.items())
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError) as err:
            raise ServerError(f"cannot reach {self.url(kind, path)}: {getattr(err, 'reason', err)}") from None

    def describe(self) -> dict[str, Any]:
        status, body = self.request("management", f"/models/{self.model_name}")
        if status != 200:
            raise ServerError(f"management API answered {status}: {body[:200].decode(errors='replace')}")
        return json.loads(body)[0]

    def predict(self, image: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
        status, body = self.request("inference", f"/predictions/{self.model_name}", data=image,
                                    headers={"Content-Type": content_type})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body.decode(errors="replace")}
