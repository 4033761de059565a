"""Package a checkpoint as a self-contained TorchServe archive: `make archive`, `python -m serving.archive`.

The `.mar` holds the weights (a plain state_dict), the handler, the model and preprocessing code
from `training/` (so the server needs nothing of this repository), `model.json` (model config,
class names, metrics, provenance), `index_to_name.json` and the per-model TorchServe config.
A `<name>.mar.sha256` file beside it lets `make serve` refuse an archive that was changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.handler import DEFAULT_VARIANT, VARIANTS
from training.checkpoint import CheckpointError, load_checkpoint
from training.data import sha256_of
from training.ensemble_train import DEFAULT_OUT as ENSEMBLE_DIR
from training.ensemble_train import load_ensemble_checkpoint

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "serving" / "handler.py"
PACKED_TRAINING_FILES = ("model.py", "preprocess.py", "ensemble.py")  # what the handler imports from training/
MODEL_CONFIG = ROOT / "configs" / "model-config.yaml"


class ArchiveError(RuntimeError):
    """The archive cannot be built or is not what was asked for."""


@dataclass(frozen=True)
class Archive:
    path: Path
    sha256: str
    size: int
    test_accuracy: float | None
    replaced: Path | None


def _checksum_file(mar: Path) -> Path:
    return mar.with_name(mar.name + ".sha256")


def archive_version(mar: Path) -> str | None:
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _stage(ckpt: dict, variant: str, checkpoint: Path, staging: Path) -> tuple[Path, Path]:
    """Write the files that go into the archive; return (weights file, folder of extra files)."""
    weights = staging / "weights.pt"
    ensemble = "members" in ckpt
    # Tensors only (an ensemble: a list of state_dicts): loads with weights_only=True.
    torch.save({"members": ckpt["members"]} if ensemble else ckpt["state_dict"], weights)
    extra = staging / "extra"
    (extra / "training").mkdir(parents=True)
    (extra / "training" / "__init__.py").write_text('"""Model and preprocessing code packed from training/."""\n')
    for name in PACKED_TRAINING_FILES:
        shutil.copy2(ROOT / "training" / name, extra / "training" / name)
    meta = {
        "model_config": ckpt["model_config"],
        "class_names": ckpt["class_names"],
        "normalization": ckpt["normalization"],
        "variant": variant,
        "metrics": {k: ckpt.get("metrics", {}).get(k) for k in ("test_accuracy", "val_accuracy", "epochs")},
        "provenance": ckpt.get("provenance", {}),
        "checkpoint": {"file": checkpoint.name, "sha256": sha256_of(checkpoint)},
    }
    if ensemble:  # the handler runs the members as one model (training/ensemble.py)
        meta["ensemble"] = {"members": len(ckpt["members"]), "temperatures": ckpt["temperatures"],
                            "method": "grouped", "member_test_accuracy": ckpt["metrics"]["member_test_accuracy"]}
    (extra / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    (extra / "index_to_name.json").write_text(json.dumps(dict(enumerate(ckpt["class_names"]))) + "\n")
    return weights, extra


def build_archive(checkpoint: Path, model_store: Path, name: str, version: str, variant: str = DEFAULT_VARIANT,
                  force: bool = False, ensemble: bool = False) -> Archive:
    if variant not in VARIANTS:
        raise ArchiveError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if ensemble and variant == "int8":
        raise ArchiveError("int8 ensembles are not supported: the grouped forward needs float linear layers")
    ckpt = load_ensemble_checkpoint(checkpoint) if ensemble else load_checkpoint(checkpoint)
    target = model_store / f"{name}.mar"
    existing = archive_version(target) if target.exists() else None
    if target.exists() and existing in (version, None) and not force:
        raise ArchiveError(f"{target} (version {existing or 'unknown'}) already exists: pass --force to replace it")
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnist-archive-") as tmp:
        staging = Path(tmp)
        weights, extra = _stage(ckpt, variant, checkpoint, staging)
        export = staging / "export"
        export.mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", version,
               "--serialized-file", str(weights), "--handler", str(HANDLER), "--extra-files", str(extra),
               "--config-file", str(MODEL_CONFIG), "--export-path", str(export)]
        # The archiver stages files in $TMPDIR/<model-name> and deletes that folder first: a
        # private TMPDIR keeps two archive runs (or a user's own folder of that name) apart.
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {result.stderr.strip()[-500:]}")
        built = export / f"{name}.mar"
        replaced = None
        if existing is not None and existing != version:
            replaced = model_store / f"{name}-{existing}.mar"  # another version: kept, not overwritten
            os.replace(target, replaced)
            if _checksum_file(target).exists():
                os.replace(_checksum_file(target), _checksum_file(replaced))
        # Copy beside the target, then rename: the store never holds a half-written archive.
        partial = model_store / f".{name}.mar.partial"
        shutil.copyfile(built, partial)
        os.replace(partial, target)
    digest = sha256_of(target)
    _checksum_file(target).write_text(f"{digest}  {target.name}\n")
    return Archive(target, digest, target.stat().st_size, ckpt.get("metrics", {}).get("test_accuracy"), replaced)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.archive", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--model-store", default="model_store", type=Path)
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=VARIANTS,
                        help=f"load-time optimisation applied by the handler (default: {DEFAULT_VARIANT})")
    parser.add_argument("--force", action="store_true", help="replace an archive of the same name and version")
    parser.add_argument("--ensemble", nargs="?", const=ENSEMBLE_DIR / "ensemble.pt", type=Path, default=None,
                        metavar="ENSEMBLE_PT", help="pack the members of `make train-ensemble` into this one .mar "
                        f"(default {ENSEMBLE_DIR / 'ensemble.pt'}; replaces --checkpoint)")
    args = parser.parse_args(argv)
    if args.ensemble is not None:
        args.checkpoint = args.ensemble
    try:
        archive = build_archive(args.checkpoint, args.model_store, args.model_name, args.version,
                                args.variant, args.force, ensemble=args.ensemble is not None)
    except (CheckpointError, ArchiveError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    accuracy = "n/a" if archive.test_accuracy is None else f"{archive.test_accuracy:.2%}"
    print(f"archive        {archive.path}  (version {args.version}, variant {args.variant})")
    print(f"size           {archive.size / 1e6:.2f} MB")
    print(f"sha256         {archive.sha256}")
    print(f"test accuracy  {accuracy} (recorded in {args.checkpoint})")
    if archive.replaced:
        print(f"previous version kept as {archive.replaced}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
