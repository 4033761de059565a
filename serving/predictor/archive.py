"""A signed .mar → a private, verified, unpacked copy, and the served code packed in it, imported.

The predictor serves the archive's own served core (training/core/) and worker modules (served.py,
oip.py, variants.py), not whatever `training` this process could import: the answers are then the
ones TorchServe gives for the same archive. The archive's bytes are read once, checked against the
trusted public keys and written to a folder only this user can read, so nothing that can write the
model store (or the mounted volume) can swap the file between the check and the load.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from serving.signing import Signature, SignatureError, verified_copy

PACKED = ("training.core", "serving.worker")  # what `make archive` packs (serving/archive.py: CORE, WORKER)


class PredictorError(RuntimeError):
    """The archive cannot be served: unsigned, untrusted, modified, unreadable or too old for the predictor."""


@dataclass(frozen=True)
class Unpacked:
    model_dir: Path
    signature: Signature
    name: str
    version: str


def unpack_verified(mar: Path, workdir: Path | None = None) -> Unpacked:
    """Verify `mar` (Ed25519, against the trusted keys) and unpack that verified copy; PredictorError if not."""
    if not mar.is_file():
        raise PredictorError(f"{mar}: no such archive (the storageUri's bundle mounts at /mnt/models)")
    workdir = Path(tempfile.mkdtemp(prefix="mnist-predictor-")) if workdir is None else workdir  # mode 0700
    try:
        signature = verified_copy(mar, workdir)
    except SignatureError as err:
        raise PredictorError(str(err)) from None
    model_dir = workdir / "model"
    try:
        with zipfile.ZipFile(workdir / mar.name) as z:
            z.extractall(model_dir)
        model = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise PredictorError(f"{mar} is signed but not a readable model archive: {err}") from None
    return Unpacked(model_dir, signature, model.get("modelName", mar.stem), str(model.get("modelVersion", "")))


def import_packed(model_dir: Path) -> dict[str, ModuleType]:
    """The archive's modules served.py, oip.py and variants.py (and the core they import), from `model_dir`.

    The packed `training/` and `serving/` folders go first on the search path of this process's own
    packages of those names; that works only while no packed module was imported from elsewhere."""
    early = [name for name in PACKED if name in sys.modules]
    if early:
        raise PredictorError(f"{', '.join(early)} imported before the archive was loaded: the predictor must "
                             "serve the archive's own code (import serving.predictor.model, not the core)")
    for package in ("training", "serving"):
        if not (model_dir / package).is_dir():
            raise PredictorError(f"the archive has no packed {package}/ folder: rebuild it with `make archive`")
        importlib.import_module(package).__path__.insert(0, str(model_dir / package))
    try:
        modules = {name: importlib.import_module(f"serving.worker.{name}") for name in ("served", "oip", "variants")}
    except ModuleNotFoundError as err:
        raise PredictorError(f"the archive was built before the KServe predictor existed ({err}): "
                             "rebuild it with `make archive ARGS=--force`") from None
    for module in modules.values():  # proof, not hope: the code that answers is the archive's
        if not Path(module.__file__ or "").resolve().is_relative_to(model_dir.resolve()):
            raise PredictorError(f"{module.__name__} was imported from {module.__file__}, not from the archive")
    return modules
