"""Feedback keys: who may write corrections through the API (serving/feedback/api.py).

Not the inference token: anyone who may ask the model something may not thereby write training data.
The keys live in `feedback.keys` in the key dir of serving/signing.py ($MNIST_SERVE_KEY_DIR, else
~/.config/mnist-serve), one `name secret` a line, mode 0600. `make feedback-key NAME=...` adds one and
prints its secret once; the name is what rows record as their source and what the rate limit counts.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path

from serving.signing import key_dir

KEYS_FILE = "feedback.keys"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class FeedbackKeyError(Exception):
    pass


def keys_path(directory: Path | None = None) -> Path:
    return (directory or key_dir()) / KEYS_FILE


def read_keys(directory: Path | None = None) -> dict[str, str]:
    """name → secret; none where the file does not exist yet."""
    path = keys_path(directory)
    if not path.exists():
        return {}
    if path.stat().st_mode & 0o077:
        raise FeedbackKeyError(f"{path} is readable by others: chmod 600 it")
    keys = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, secret = line.strip().partition(" ")
            keys[name] = secret.strip()
    return keys


def add_key(name: str, directory: Path | None = None) -> str:
    """A new secret for `name` (replacing its old one), written with mode 0600; returns the secret."""
    if not NAME.fullmatch(name) or name == "page":  # "page" is the page's own source
        raise FeedbackKeyError(f"a key name is 1-32 of A-Z a-z 0-9 _ . - (not 'page'), got {name!r}")
    keys = {**read_keys(directory), name: secrets.token_urlsafe(32)}
    path = keys_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{n} {s}\n" for n, s in keys.items()))
    os.replace(partial, path)
    return keys[name]


def key_name(authorization: str | None, keys: dict[str, str]) -> str | None:
    """The name of the key in an `Authorization: Bearer <secret>` header, or None (compared in constant time)."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    found = None
    for name, known in keys.items():
        if hmac.compare_digest(known.encode(), secret.strip().encode()):
            found = name
    return found
