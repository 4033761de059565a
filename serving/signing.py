"""Ed25519 signatures for model archives: `make keygen`, signed by `make archive`, checked by every load.

A `.sha256` beside an archive catches corruption, not tampering: whoever can write the archive can
write its checksum. A signature cannot be recomputed without the private key, which lives outside
the repository and the model store:

    <key dir>/signing-key.pem        the private key (mode 0600, dir 0700), used by `make archive`
    <key dir>/trusted/<fp>.pub       the public keys the server trusts (any number: rotation)

The key dir is $MNIST_SERVE_KEY_DIR, else $XDG_CONFIG_HOME/mnist-serve, else ~/.config/mnist-serve.
A server that did not sign (another machine, a container) needs only public keys: $MNIST_SERVE_TRUSTED_DIR
names a folder of `.pub` files trusted in addition to `<key dir>/trusted/` (mount it read-only).
`<name>.mar.sig` is a small JSON file: the signer's key fingerprint, the archive's SHA-256 and the
base64 signature over the archive's bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from serving.errors import ServerError
from training.cli import ArgumentParser

PRIVATE_KEY = "signing-key.pem"
TRUSTED = "trusted"


class SignatureError(ServerError):
    """An archive is unsigned, signed by a key the server does not trust, or changed after signing."""


@dataclass(frozen=True)
class Signature:
    path: Path
    signer: str  # fingerprint of the public key
    sha256: str


def key_dir() -> Path:
    if env := os.environ.get("MNIST_SERVE_KEY_DIR"):
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "mnist-serve"


def trusted_dir() -> Path:
    """Where `keygen` trusts its own keys and `untrust` removes them."""
    return key_dir() / TRUSTED


def trusted_dirs() -> list[Path]:
    extra = os.environ.get("MNIST_SERVE_TRUSTED_DIR")
    return [trusted_dir(), *([Path(extra)] if extra else [])]


def fingerprint(public: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key: short enough to read aloud."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def trust(public: Ed25519PublicKey, directory: Path | None = None) -> Path:
    directory = directory or trusted_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{fingerprint(public)}.pub"
    path.write_bytes(_public_pem(public))
    return path


def trusted_keys(directory: Path | None = None) -> dict[str, Ed25519PublicKey]:
    """The public keys in `directory`, or by default in every trusted folder, by fingerprint."""
    keys = {}
    folders = [directory] if directory else trusted_dirs()
    for path in [p for d in folders if d.is_dir() for p in sorted(d.glob("*.pub"))]:
        key = serialization.load_pem_public_key(path.read_bytes())
        if isinstance(key, Ed25519PublicKey):
            keys[fingerprint(key)] = key  # named by its content, whatever the file is called
    return keys


def keygen(directory: Path | None = None, rotate: bool = False) -> tuple[Ed25519PrivateKey, str | None]:
    """Create the signing key (and trust its public half); with `rotate`, replace an existing one.

    The retired key's public half stays trusted so archives it signed keep loading until they are
    re-signed; `untrust` removes it. Returns (new key, retired fingerprint or None).
    """
    directory = directory or key_dir()
    path = directory / PRIVATE_KEY
    retired = None
    if path.exists():
        if not rotate:
            raise SignatureError(f"{path} already exists: pass --rotate to replace it")
        retired = fingerprint(_load_private(path).public_key())
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    partial = directory / f".{PRIVATE_KEY}.partial"
    # Created with 0600 rather than chmod-ed after: the key is never readable by others, not even briefly.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(partial, path)
    trust(key.public_key(), directory / TRUSTED)
    return key, retired


def _load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def signing_key(directory: Path | None = None) -> Ed25519PrivateKey:
    """The private key, created on first use: `make archive` needs no separate `make keygen`."""
    directory = directory or key_dir()
    path = directory / PRIVATE_KEY
    if not path.exists():
        return keygen(directory)[0]
    if path.stat().st_mode & 0o077:
        raise SignatureError(f"{path} is readable by others: `chmod 600 {path}` (or rotate the key if it leaked)")
    return _load_private(path)


def signature_path(mar: Path) -> Path:
    return mar.with_name(mar.name + ".sig")


def sign_archive(mar: Path, directory: Path | None = None) -> Signature:
    key = signing_key(directory)
    data = mar.read_bytes()
    sig = {"algorithm": "ed25519", "signer": fingerprint(key.public_key()), "sha256": hashlib.sha256(data).hexdigest(),
           "signature": base64.b64encode(key.sign(data)).decode()}
    path = signature_path(mar)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(sig, indent=2) + "\n")
    os.replace(partial, path)
    return Signature(path, sig["signer"], sig["sha256"])


def read_signature(mar: Path) -> dict:
    path = signature_path(mar)
    if not path.exists():
        raise SignatureError(f"{mar} is not signed ({path.name} is missing): "
                             "rebuild it with `make archive ARGS=--force`")
    try:
        sig = json.loads(path.read_text())
        sig["raw"] = base64.b64decode(sig["signature"], validate=True)
        return sig
    except (ValueError, KeyError, TypeError):
        raise SignatureError(f"{path} is not a signature file written by `make archive`") from None


def verify_archive(mar: Path, trusted: dict[str, Ed25519PublicKey] | None = None,
                   data: bytes | None = None) -> Signature:
    """The archive's signer, or SignatureError with a one-line reason. `data`: the bytes to check (read once
    by the caller, who then serves exactly those: see verified_copy); default: the file's."""
    sig = read_signature(mar)
    trusted = trusted_keys() if trusted is None else trusted
    signer = str(sig.get("signer"))
    if signer not in trusted:
        raise SignatureError(f"{mar} is signed by key {signer}, which this server does not trust "
                             f"(trusted: {', '.join(trusted) or 'none in ' + ', '.join(map(str, trusted_dirs()))})")
    data = mar.read_bytes() if data is None else data
    try:
        trusted[signer].verify(sig["raw"], data)
    except InvalidSignature:
        raise SignatureError(f"{mar} does not match its signature by key {signer}: it was modified after signing "
                             "(or re-signed by another key); rebuild it with `make archive ARGS=--force`") from None
    return Signature(signature_path(mar), signer, hashlib.sha256(data).hexdigest())


def verified_copy(mar: Path, folder: Path, trusted: dict[str, Ed25519PublicKey] | None = None) -> Signature:
    """Read `mar` once, verify those bytes, and write them to `folder` (private to this user), which is what
    gets served: whoever can write the model store cannot swap the file between the check and the load."""
    data = mar.read_bytes()
    signature = verify_archive(mar, trusted, data)
    target = folder / mar.name
    tmp = folder / f".{mar.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return signature


def untrust(fp: str, directory: Path | None = None) -> bool:
    directory = directory or trusted_dir()
    removed = False
    for path in directory.glob("*.pub") if directory.is_dir() else []:
        key = serialization.load_pem_public_key(path.read_bytes())
        if isinstance(key, Ed25519PublicKey) and fingerprint(key) == fp:
            path.unlink()
            removed = True
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.signing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen", help="create the signing key and trust its public key")
    gen.add_argument("--rotate", action="store_true", help="replace the key; the old public key stays trusted")
    for name, text in (("sign", "sign archives with the current key"), ("verify", "check archives")):
        sub.add_parser(name, help=text).add_argument("archives", nargs="+", type=Path)
    sub.add_parser("untrust", help="stop trusting a key").add_argument("fingerprint")
    sub.add_parser("keys", help="the signing key and the trusted keys")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            key, retired = keygen(rotate=args.rotate)
            print(f"signing key {fingerprint(key.public_key())} in {key_dir() / PRIVATE_KEY} "
                  f"(trusted in {trusted_dir()})")
            if retired:
                print(f"retired key {retired} stays trusted: re-sign with `python -m serving.signing sign "
                      f"model_store/*.mar`, then `python -m serving.signing untrust {retired}`")
        elif args.command == "sign":
            for mar in args.archives:
                print(f"{mar}: signed by {sign_archive(mar).signer}")
        elif args.command == "verify":
            for mar in args.archives:
                print(f"{mar}: good signature by {verify_archive(mar).signer}")
        elif args.command == "untrust":
            if not untrust(args.fingerprint):
                raise SignatureError(f"no trusted key {args.fingerprint} in {trusted_dir()}")
            print(f"key {args.fingerprint} is no longer trusted")
        else:
            path = key_dir() / PRIVATE_KEY
            current = fingerprint(_load_private(path).public_key()) if path.exists() else None
            print(f"signing key  {current or 'none yet (created by the first `make archive`)'}  {path}")
            for fp in trusted_keys():
                print(f"trusted      {fp}")
    except (SignatureError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
