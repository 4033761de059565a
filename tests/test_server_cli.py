"""The serving CLI and lifecycle without a running server: addresses, crash-loop counting, one-line
errors, and the Makefile passing MODEL_NAME to every server command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving import cli
from serving.errors import ServerError
from serving.ports import normalize_address
from serving.server import TorchServe

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT  # noqa: E402


@pytest.mark.parametrize(("value", "kind", "url"), [
    ("127.0.0.1:9080", "inference", "http://127.0.0.1:9080"),
    ("[::1]:9081", "management", "http://[::1]:9081"),
    ("http://[::1]:9081", "management", "http://[::1]:9081"),
    ("localhost", "inference", "http://localhost:8080"),
    ("127.0.0.1", "metrics", "http://127.0.0.1:8082"),
    ("https://example.test:8443", "inference", "https://example.test:8443"),
])
def test_addresses_take_ipv6_and_default_ports(value, kind, url):
    assert normalize_address(value, kind) == url


@pytest.mark.parametrize("value", ["127.0.0.1:http", "ftp://127.0.0.1:21", "127.0.0.1:8080/predictions", ":8080"])
def test_a_bad_address_is_a_one_line_error(value):
    with pytest.raises(ServerError, match=r"^INFERENCE_ADDRESS=.* is not an address: use HOST:PORT"):
        normalize_address(value, "inference")


def test_cli_errors_are_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVE_DIR", str(tmp_path))
    monkeypatch.setenv("INFERENCE_ADDRESS", "127.0.0.1:notaport")
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INFERENCE_ADDRESS='127.0.0.1:notaport' is not an address")
    assert err.count("\n") == 1


def test_missing_torchserve_binary_is_a_clear_error(tiny_archive, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-venv" / "bin" / "python"))
    server = TorchServe.on_free_ports(tmp_path / "run", tiny_archive[1].path.parent)
    with pytest.raises(ServerError, match=r"^no torchserve next to .*no-venv/bin/python: run `make setup`$"):
        server.start(timeout=10)


def test_crash_loops_are_counted_from_this_start_only(tmp_path):
    server = TorchServe(run_dir=tmp_path, model_store=tmp_path)
    log = tmp_path / "ts_log.log"
    log.write_text("2026 WARN Load model failed: mnist, error: worker died.\n" * 5)  # an earlier start
    server.mark_log_start()
    assert server.failed_worker_loads() == 0
    with log.open("a") as f:
        f.write("2026 WARN Load model failed: mnist, error: worker died.\n")
    assert server.failed_worker_loads() == 1


@pytest.mark.parametrize("target", ["status", "token", "stop", "predict", "serve"])
def test_make_passes_model_name_to_every_server_command(target):
    out = subprocess.run(["make", "-n", "-o", ".venv/.setup-stamp", target, "MODEL_NAME=digits"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in out.splitlines() if "serving.cli" in line]
    assert "--model-name digits" in line


def test_token_without_a_running_server_says_so_instead_of_printing_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVE_DIR", str(tmp_path))
    assert cli.main(["token", "inference"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "error: TorchServe is not running: `make serve` first\n")
