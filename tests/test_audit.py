"""`make audit`: the allow-list's format, the real TorchServe jar's inventory, and PyPI's answers.

Nothing here needs the network: PyPI's JSON API is played by a local HTTP server with canned answers,
and "unreachable" is a closed local port. The one test that asks the real PyPI skips when it cannot.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bench import audit
from bench.audit import AuditError, load_accepted, verdicts
from bench.jar_inventory import KNOWN_FIXES, check, class_version_constant, installed_jar, is_fixed, read_inventory
from bench.pypi_advisories import PyPIUnreachable, check_pin, fetch, normalize, read_pins


def test_the_allow_list_is_well_formed_and_names_what_the_audit_checks():
    risks = load_accepted(audit.ACCEPTED)
    assert risks, "configs/accepted-risks.yaml is empty"
    jar_libraries = {name for name, *_ in KNOWN_FIXES}
    python_packages = set(read_pins(*audit.LOCKS))
    for risk in risks:
        assert risk.package in jar_libraries | python_packages, f"{risk.id}: no package {risk.package!r} is audited"
        assert risk.id.startswith(("CVE-", "GHSA-", "PYSEC-")), risk.id


@pytest.mark.parametrize(("text", "message"), [
    ("id: CVE-1\n", "expected a list"),
    ("- id: CVE-1\n  package: netty\n  why: old\n", "needs mitigation"),
    ("- id: CVE-1\n  package: netty\n  why: ' '\n  mitigation: loopback\n", "needs why"),
    ("- id: CVE-1\n  package: netty\n  why: old\n  mitigation: loopback\n  until: 2027\n", "unknown keys ['until']"),
    ("- id: CVE-1\n  package: netty\n  why: a\n  mitigation: b\n- id: CVE-1\n  package: Netty\n  why: c\n"
     "  mitigation: d\n", "entry 2 repeats CVE-1"),
    ("- [CVE-1, netty]\n", "entry 1 is not a mapping"),
])
def test_a_malformed_allow_list_is_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "accepted.yaml"
    path.write_text(text)
    with pytest.raises(AuditError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_accepted(path)


def test_the_real_jar_bundles_the_versions_the_docs_state_and_each_finding_is_accepted():
    inventory = read_inventory(installed_jar())
    versions = {lib.name: lib.version for lib in inventory.libraries}
    assert versions["netty"] == "4.1.53.Final"
    assert versions["grpc-java"] == "1.50.0"
    assert versions["log4j-core"] == "2.17.1"
    assert versions["snakeyaml"] is None  # present, version not recorded in the jar
    # Neither netty copy has the Rapid Reset decoder: the shaded one's version is unknown, this is the evidence.
    assert inventory.rst_limit == {"netty": False, "grpc's shaded netty": False}
    findings = check(inventory)
    assert {(f.package, f.id) for f in findings if f.affected} == {
        ("netty", "CVE-2021-43797"), ("netty", "CVE-2024-29025"), ("netty", "CVE-2026-33870"),
        ("netty", "CVE-2023-44487"), ("netty", "CVE-2025-55163"), ("netty", "CVE-2026-33871"),
        ("grpc-java", "CVE-2023-44487"), ("grpc-java", "CVE-2025-55163")}
    assert {f.id for f in findings if not f.affected} == {"CVE-2021-44228", "CVE-2021-45046", "CVE-2021-45105",
                                                        "CVE-2021-44832"}
    rows = verdicts([], findings, load_accepted(audit.ACCEPTED))
    assert [r for r in rows if r["status"] == "FAIL"] == []


def test_a_fix_counts_on_its_own_line_or_past_the_newest():
    grpc = ("1.56.3", "1.57.3", "1.58.1")
    assert not is_fixed("1.50.0", grpc) and not is_fixed("1.56.2", grpc) and not is_fixed("1.58.0", grpc)
    assert is_fixed("1.57.3", grpc) and is_fixed("1.58.1", grpc) and is_fixed("1.60.0", grpc)
    assert not is_fixed("4.1.53.Final", ("4.1.100.Final",)) and is_fixed("4.2.0.Final", ("4.1.100.Final",))


def test_the_version_constant_is_read_from_a_class_files_utf8_entry():
    utf8 = b"\x01\x00\x06" + b"1.50.0"
    assert class_version_constant(b"\xca\xfe\xba\xbe" + b"\x01\x00\x03abc" + utf8) == "1.50.0"
    assert class_version_constant(b"\x01\x00\x09" + b"1.50.0xyz") is None  # the length must match exactly


class FakePyPI(BaseHTTPRequestHandler):
    """PyPI's JSON API for three projects, answering as it does here: some releases 404, the project page not."""

    PAGES: ClassVar[dict[str, dict[str, Any]]] = {
        "/pypi/alpha/1.0/json": {"info": {"version": "1.0"}, "vulnerabilities": [
            {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2099-0001"], "fixed_in": ["1.1"], "link": "https://x/a"},
            {"id": "PYSEC-2099-2", "aliases": [], "fixed_in": [], "link": "", "withdrawn": "2099-01-01"}]},
        "/pypi/beta/json": {"info": {"version": "2.0"}, "vulnerabilities": []},
        "/pypi/gamma/json": {"info": {"version": "3.0"}, "vulnerabilities": [
            {"id": "GHSA-zzzz-zzzz-zzzz", "aliases": [], "fixed_in": [], "link": ""}]},
        "/pypi/alpha/json": {"info": {"version": "1.0"}, "vulnerabilities": []},
    }

    def do_GET(self) -> None:
        page = self.PAGES.get(self.path)
        self.send_response(200 if page else 404)
        self.end_headers()
        if page:
            self.wfile.write(json.dumps(page).encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_pypi():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePyPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/pypi"
    server.shutdown()


def test_a_pin_is_checked_by_its_release_or_as_the_latest_and_otherwise_not_at_all(fake_pypi):
    alpha, beta, gamma = (check_pin(n, v, fake_pypi) for n, v in (("alpha", "1.0"), ("beta", "2.0"), ("gamma", "1.0")))
    assert (alpha.source, [a.cve for a in alpha.advisories]) == ("release", ["CVE-2099-0001"])  # withdrawn: dropped
    assert (beta.source, beta.advisories) == ("latest", [])
    # gamma 1.0 is not its latest release (3.0): the latest's advisories say nothing about 1.0.
    assert (gamma.source, gamma.latest, gamma.advisories) == (None, "3.0", [])


def run_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str], accepted: str, *flags: str) -> tuple[int, str]:
    lock = "alpha==1.0 \\\n    --hash=sha256:00\nBeta==2.0\ngamma==1.0 ; python_version > '3'\n"  # pip-compile style
    (tmp_path / "test.lock").write_text(lock)
    (tmp_path / "accepted.yaml").write_text(accepted)
    code = audit.main(["--lock", str(tmp_path / "test.lock"), "--accepted", str(tmp_path / "accepted.yaml"),
                       "--no-record", *flags])
    return code, " ".join(capsys.readouterr().out.split())  # lines wrap where the terminal would


def test_an_unaccepted_vulnerability_fails_the_audit_and_an_accepted_one_does_not(tmp_path, capsys, fake_pypi):
    code, out = run_audit(tmp_path, capsys, "[]", "--pypi-url", fake_pypi)
    assert code == 1
    assert "FAIL CVE-2099-0001 alpha 1.0, fixed in 1.1" in out
    assert "NOT checked 1, older than their latest release: gamma" in out
    assert "result: 9 without an accepted-risk entry" in out  # alpha's, and the jar's 8: none has an entry
    entry = "- id: {}\n  package: {}\n  why: test\n  mitigation: test\n"
    jar = "".join(entry.format(i, p) for p, i, *_ in KNOWN_FIXES if p != "log4j-core")
    code, out = run_audit(tmp_path, capsys, jar + entry.format("GHSA-aaaa-bbbb-cccc", "alpha")
                          + entry.format("CVE-2099-0009", "beta"), "--pypi-url", fake_pypi)
    assert code == 0, out
    assert "accepted CVE-2099-0001 alpha 1.0" in out
    assert "stale CVE-2099-0009 beta: in accepted.yaml but no longer found" in out


def test_unreachable_pypi_skips_the_python_check_and_says_so(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    accepted = audit.ACCEPTED.read_text()
    code, out = run_audit(tmp_path, capsys, accepted, "--pypi-url", f"http://127.0.0.1:{closed}/pypi")
    assert code == 0, out  # the jar's findings are all accepted; the Python side was not checked
    assert "SKIPPED: PyPI is unreachable" in out and "None of the 3 pins was checked." in out
    code, out = run_audit(tmp_path, capsys, accepted, "--offline")
    assert "SKIPPED: --offline. None of the 3 pins was checked." in out


def test_the_real_pypi_answers_for_a_pin_at_its_latest_release():
    """Networked: skips where pypi.org does not answer, and under `make test-fast` (no download)."""
    if os.environ.get("MNIST_OFFLINE") == "1":
        pytest.skip("MNIST_OFFLINE=1 (make test-fast) asks nothing of the network")
    try:
        project = fetch("https://pypi.org/pypi/pip/json")
    except PyPIUnreachable as err:
        pytest.skip(f"PyPI is unreachable from here ({err}): the Python half of `make audit` cannot run")
    assert project is not None
    latest = project["info"]["version"]
    status = check_pin(normalize("pip"), latest)
    assert status.source in ("release", "latest") and status.error is None
