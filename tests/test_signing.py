"""serving/signing.py: archives load only when signed by a trusted key, whatever happened to the `.sha256`.

Every test runs with conftest.py's throwaway key dir (MNIST_SERVE_KEY_DIR), never the user's own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest

from serving import signing
from serving.server import TorchServe
from serving.signing import SignatureError, fingerprint, keygen, sign_archive, trusted_keys, verify_archive

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]


@pytest.fixture
def store(tiny_archive, tmp_path) -> Path:
    """A private copy of the tiny archive's model store (mnist.mar, .sha256, .sig)."""
    return Path(shutil.copytree(tiny_archive[1].path.parent, tmp_path / "store"))


@pytest.fixture
def no_java(tmp_path, monkeypatch):
    """The signature is checked before Java is looked for: these tests need none."""
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def server_over(store: Path, run_dir: Path) -> TorchServe:
    return TorchServe.on_free_ports(run_dir, store)


def refusal(store: Path, run_dir: Path) -> str:
    server = server_over(store, run_dir)
    with pytest.raises(SignatureError) as err:
        server.start(timeout=30)
    assert server.running_pid() is None and not run_dir.exists()  # refused before anything started
    return str(err.value)


def test_tests_sign_with_a_throwaway_key(signing_key_dir):
    assert signing.key_dir() == signing_key_dir
    assert ".config" not in signing_key_dir.parts


def test_make_archive_signs_with_a_private_key_created_on_first_use(tiny_archive, signing_key_dir):
    _, archive = tiny_archive
    key_file = signing_key_dir / "signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(signing_key_dir.stat().st_mode) == 0o700
    current = fingerprint(signing.signing_key().public_key())
    sig = json.loads((archive.path.parent / "mnist.mar.sig").read_text())
    assert sig["signer"] == archive.signer == current
    assert sig["sha256"] == archive.sha256 == hashlib.sha256(archive.path.read_bytes()).hexdigest()
    assert verify_archive(archive.path).signer == current
    assert current in trusted_keys()
    assert not list(archive.path.parent.glob("*.pem"))  # the private key never enters the store


def test_tampered_archive_with_a_recomputed_sha256_is_refused(store, tmp_path, no_java):
    mar = store / "mnist.mar"
    data = bytearray(mar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mar.write_bytes(bytes(data))
    (store / "mnist.mar.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  mnist.mar\n")
    message = refusal(store, tmp_path / "run")
    assert "does not match its signature" in message and "modified after signing" in message
    assert "\n" not in message


def test_archive_signed_by_another_key_is_refused(store, tmp_path, no_java):
    mar = store / "mnist.mar"
    other_dir = tmp_path / "other-keys"
    other, _ = keygen(other_dir)
    sign_archive(mar, other_dir)  # a valid signature, by a key the server does not trust
    assert refusal(store, tmp_path / "run") == (
        f"{mar} is signed by key {fingerprint(other.public_key())}, which this server does not trust "
        f"(trusted: {', '.join(trusted_keys())})")
    # Claiming the trusted key's fingerprint does not help: the signature does not verify with it.
    sig = json.loads(signing.signature_path(mar).read_text())
    sig["signer"] = fingerprint(signing.signing_key().public_key())
    signing.signature_path(mar).write_text(json.dumps(sig))
    assert "does not match its signature" in refusal(store, tmp_path / "run")


def test_unsigned_archive_is_refused(store, tmp_path, no_java):
    (store / "mnist.mar.sig").unlink()
    assert refusal(store, tmp_path / "run") == (
        f"{store / 'mnist.mar'} is not signed (mnist.mar.sig is missing): rebuild it with `make archive ARGS=--force`")


def test_rotation_keeps_old_archives_loading_until_the_old_key_is_untrusted(store, tmp_path):
    keys = tmp_path / "keys"
    first, _ = keygen(keys)
    with pytest.raises(SignatureError, match="already exists: pass --rotate"):
        keygen(keys)
    mar = store / "mnist.mar"
    sign_archive(mar, keys)
    second, retired = keygen(keys, rotate=True)
    assert retired == fingerprint(first.public_key())
    trusted = trusted_keys(keys / "trusted")
    assert set(trusted) == {retired, fingerprint(second.public_key())}
    assert verify_archive(mar, trusted).signer == retired
    assert signing.untrust(retired, keys / "trusted")
    with pytest.raises(SignatureError, match="which this server does not trust"):
        verify_archive(mar, trusted_keys(keys / "trusted"))
    sign_archive(mar, keys)  # re-signed with the new key
    assert verify_archive(mar, trusted_keys(keys / "trusted")).signer == fingerprint(second.public_key())


def test_a_private_key_readable_by_others_is_not_used(tmp_path):
    keys = tmp_path / "keys"
    keygen(keys)
    (keys / "signing-key.pem").chmod(0o644)
    with pytest.raises(SignatureError, match="is readable by others"):
        signing.signing_key(keys)


def test_a_server_that_did_not_sign_trusts_a_mounted_folder_of_public_keys(store, tmp_path, monkeypatch):
    mar = store / "mnist.mar"
    other_dir = tmp_path / "host-keys"
    other, _ = keygen(other_dir)
    sign_archive(mar, other_dir)
    with pytest.raises(SignatureError, match="which this server does not trust"):
        verify_archive(mar)
    monkeypatch.setenv("MNIST_SERVE_TRUSTED_DIR", str(other_dir / "trusted"))  # e.g. mounted read-only
    assert verify_archive(mar).signer == fingerprint(other.public_key())
    assert fingerprint(signing.signing_key().public_key()) in trusted_keys()  # in addition to its own


def _modified(store: Path, tmp_path: Path) -> str:
    mar = store / "mnist.mar"
    data = bytearray(mar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mar.write_bytes(bytes(data))
    (store / "mnist.mar.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  mnist.mar\n")
    return "does not match its signature"


def _untrusted(store: Path, tmp_path: Path) -> str:
    keygen(tmp_path / "other-keys")
    sign_archive(store / "mnist.mar", tmp_path / "other-keys")
    return "which this server does not trust"


def _unsigned(store: Path, tmp_path: Path) -> str:
    (store / "mnist.mar.sig").unlink()
    return "is not signed"


@pytest.mark.parametrize("damage", [_modified, _untrusted, _unsigned], ids=["modified", "untrusted", "unsigned"])
def test_the_kserve_bundle_refuses_what_serve_refuses(store, tmp_path, damage):
    """Nothing goes to the cluster that `make serve` would not load: the bundle step checks the signature."""
    from serving.kserve import BundleError, build_bundle

    reason = damage(store, tmp_path)
    with pytest.raises(BundleError, match=reason) as refused:
        build_bundle(store, "mnist", tmp_path / "bundle")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.slow
def test_torchserve_loads_a_private_verified_copy_not_the_store(store, tmp_path):
    """Verify, then serve those very bytes: TorchServe's model store is a copy in the private run directory,
    so whoever can write model_store/ cannot swap the archive between the check and the load."""
    original = (store / "mnist.mar").read_bytes()
    server = server_over(store, tmp_path / "run")
    server.start(timeout=180)
    try:
        served = tmp_path / "run" / "store"
        props = dict(line.split("=", 1) for line in (tmp_path / "run" / "config.properties").read_text().splitlines()
                     if "=" in line and not line.startswith("#"))
        assert props["model_store"] == str(served.resolve())
        assert (served / "mnist.mar").read_bytes() == original
        assert stat.S_IMODE(served.stat().st_mode) == 0o700
        (store / "mnist.mar").write_bytes(b"swapped after the check")
        assert (served / "mnist.mar").read_bytes() == original
    finally:
        server.stop()
