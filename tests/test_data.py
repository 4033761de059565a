"""training.data: MNIST lands in <root>/MNIST/raw verified, whatever the sources do. No network here.

The sources are stand-ins that copy the real files from the session's verified data dir, whole,
truncated or not at all, so every checksum in these tests is the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training import data
from training.data import SHA256, DataError, data_dir, ensure_mnist, missing_files, raw_dir

ROOT = Path(__file__).resolve().parent.parent

NAMES = list(SHA256)
LABELS = "train-labels-idx1-ubyte"  # the smallest-but-one file: cheap to damage


class CopySource:
    """A source that copies the real files into the staging folder (`broken` ones truncated) and
    records, for each call, which files were already in place in raw/."""

    def __init__(self, real_raw: Path, target_raw: Path, names=NAMES, broken=()) -> None:
        self.real_raw, self.target_raw = real_raw, target_raw
        self.names, self.broken = list(names), set(broken)
        self.calls: list[list[str]] = []

    def __call__(self, staging: Path) -> None:
        self.calls.append(sorted(p.name for p in self.target_raw.iterdir() if not p.name.startswith(".")))
        for name in self.names:
            if name in self.broken:
                (staging / name).write_bytes((self.real_raw / name).read_bytes()[:-100])
            else:
                shutil.copyfile(self.real_raw / name, staging / name)


class FailingSource:
    def __init__(self, error: Exception) -> None:
        self.error, self.calls = error, 0

    def __call__(self, staging: Path) -> None:
        self.calls += 1
        raise self.error


@pytest.fixture
def real_raw(mnist_dir: Path) -> Path:
    return raw_dir(mnist_dir)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


def place(real_raw: Path, root: Path, names=NAMES) -> None:
    raw_dir(root).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(real_raw / name, raw_dir(root) / name)


def listing(root: Path) -> list[str]:
    """Everything in raw/, hidden staging folders included: nothing but the four files may be left."""
    return sorted(p.name for p in raw_dir(root).iterdir())


def test_verified_files_already_present_call_no_source(real_raw, root):
    place(real_raw, root)
    never = FailingSource(AssertionError("a source was called"))
    assert ensure_mnist(root, sources={"never": never}, log=print) == raw_dir(root)
    assert never.calls == 0


def test_a_good_source_puts_four_verified_files_in_raw(real_raw, root):
    good = CopySource(real_raw, raw_dir(root))
    messages: list[str] = []
    assert ensure_mnist(root, sources={"good": good}, log=messages.append) == raw_dir(root)
    assert len(good.calls) == 1
    assert missing_files(root) == []
    assert listing(root) == sorted(NAMES)  # the staging folder is gone
    assert messages == ["MNIST: fetching 4 file(s) from good ...", f"MNIST: verified 4 files in {raw_dir(root)}"]


def test_a_corrupt_file_is_never_placed_and_the_next_source_is_tried(real_raw, root):
    truncating = CopySource(real_raw, raw_dir(root), broken={LABELS})
    good = CopySource(real_raw, raw_dir(root))
    ensure_mnist(root, sources={"truncating": truncating, "good": good}, log=lambda _: None)
    # When the second source ran, the first one's three good files were in place and the bad one was not.
    assert good.calls == [sorted(set(NAMES) - {LABELS})]
    assert missing_files(root) == []
    assert listing(root) == sorted(NAMES)


def test_a_source_that_raises_is_skipped(real_raw, root):
    down = FailingSource(OSError("mirror unreachable"))
    good = CopySource(real_raw, raw_dir(root))
    ensure_mnist(root, sources={"down": down, "good": good}, log=lambda _: None)
    assert down.calls == 1 and len(good.calls) == 1
    assert missing_files(root) == []


def test_when_every_source_fails_the_error_says_what_was_tried_and_what_to_do(real_raw, root):
    sources = {
        "mirror": FailingSource(OSError("mirror unreachable")),
        "silent": FailingSource(TimeoutError()),  # no message: the exception type stands in
        "truncating": CopySource(real_raw, raw_dir(root), broken={LABELS}),
    }
    with pytest.raises(DataError) as err:
        ensure_mnist(root, sources=sources, log=lambda _: None)
    assert str(err.value) == (
        f"could not get MNIST file(s) {LABELS}. Tried: mirror: mirror unreachable; silent: TimeoutError; "
        f"truncating: checksum mismatch for {LABELS}. Place the uncompressed IDX files in {raw_dir(root)}/ "
        "by hand (SHA-256 sums in training/data.py)."
    )
    assert listing(root) == sorted(set(NAMES) - {LABELS})  # the truncated file never landed


def test_no_sources_at_all_is_a_data_error(root):
    with pytest.raises(DataError, match=r"could not get MNIST file\(s\) train-images-idx3-ubyte, .*Tried: no sources"):
        ensure_mnist(root, sources={}, log=lambda _: None)


def test_a_second_call_is_a_fast_no_op(real_raw, root):
    ensure_mnist(root, sources={"good": CopySource(real_raw, raw_dir(root))}, log=lambda _: None)
    again = CopySource(real_raw, raw_dir(root))
    ensure_mnist(root, sources={"again": again}, log=lambda _: None)
    assert again.calls == []  # verified in place: nothing fetched


def test_a_corrupt_file_already_in_raw_is_replaced(real_raw, root):
    place(real_raw, root, names=[n for n in NAMES if n != LABELS])
    (raw_dir(root) / LABELS).write_bytes(b"not the labels")
    good = CopySource(real_raw, raw_dir(root))
    messages: list[str] = []
    ensure_mnist(root, sources={"good": good}, log=messages.append)
    assert messages[0] == "MNIST: fetching 1 file(s) from good ..."
    assert missing_files(root) == []


def test_data_dir_precedence_explicit_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    assert data_dir() == Path("data")
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_cli_reports_ready_data_and_exits_0(real_raw, root, capsys):
    place(real_raw, root)
    assert data.main(["--data-dir", str(root)]) == 0
    assert capsys.readouterr().out == f"MNIST ready in {raw_dir(root)}\n"


def test_cli_fetches_with_the_module_sources(real_raw, root, monkeypatch, capsys):
    monkeypatch.setattr(data, "SOURCES", {"good": CopySource(real_raw, raw_dir(root))})
    assert data.main(["--data-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"MNIST ready in {raw_dir(root)}"
    assert missing_files(root) == []


def test_cli_failure_is_one_error_line_and_exit_1(root, monkeypatch, capsys):
    monkeypatch.setattr(data, "SOURCES", {"offline": FailingSource(OSError("no network"))})
    assert data.main(["--data-dir", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: could not get MNIST file(s) ")
    assert "Tried: offline: no network." in err and "by hand" in err


def test_fast_tests_skip_rather_than_download_when_offline(tmp_path):
    """`make test-fast` (MNIST_OFFLINE=1) must not need the network: a test that wants MNIST skips."""
    env = {**os.environ, "MNIST_DIR": str(tmp_path / "mnist"), "MNIST_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests/test_preprocess.py::test_an_mnist_test_image_survives_png_and_normalizes_like_training"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "1 skipped" in out.stdout, out.stdout[-2000:]
    assert "MNIST_OFFLINE=1 forbids the download: run `make data` first" in out.stdout
    assert not (tmp_path / "mnist").exists()
