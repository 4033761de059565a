"""Package a checkpoint as a self-contained TorchServe archive: `make archive`, `python -m serving.archive`.

The `.mar` holds the weights (a plain state_dict), the handler, the model and preprocessing code
from `training/` (so the server needs nothing of this repository), `model.json` (model config,
class names, metrics, provenance), `index_to_name.json` and the per-model TorchServe config.
A `<name>.mar.sha256` file beside it records the digest (`sha256sum -c` checks a copy without this
code or a key), and `<name>.mar.sig` signs it (serving/signing.py): the server loads only archives
signed by a key it trusts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.signing import SignatureError, sign_archive, signature_path
from serving.store import archive_version, forget_default
from serving.worker.variants import (
    APPROXIMATE_VARIANTS,
    ARCHIVE_DEFAULT_VARIANT,
    DEFAULT_VARIANT,
    ONNX_FILES,
    SELF_CHECK_FILE,
    VARIANTS,
)
from training.checkpoint import CheckpointError, load_checkpoint
from training.cli import ArgumentParser
from training.data import sha256_of
from training.recipes.ensemble_train import DEFAULT_OUT as ENSEMBLE_DIR
from training.recipes.ensemble_train import load_ensemble_checkpoint, member_configs

ROOT = Path(__file__).resolve().parent.parent
# What a model archive carries, whole: the worker's code (serving/worker: handler, request parsing,
# variants, the KServe v2 protocol, worker I/O, metrics) and the served core it runs (training/core:
# model, decoding and preprocessing, OOD score, explainer, runners, precision, ensemble). Neither imports
# anything outside the two (tests/test_archive.py), so the .mar needs nothing of this repository.
WORKER = ROOT / "serving" / "worker"
HANDLER = WORKER / "handler.py"
CORE = ROOT / "training" / "core"
MODEL_CONFIG = ROOT / "configs" / "model-config.yaml"  # CPU profile; configs/model-config-gpu.yaml for GPUs


class ArchiveError(RuntimeError):
    """The archive cannot be built or is not what was asked for."""


@dataclass(frozen=True)
class Archive:
    path: Path
    sha256: str
    size: int
    test_accuracy: float | None
    replaced: Path | None
    signer: str | None = None


def _checksum_file(mar: Path) -> Path:
    return mar.with_name(mar.name + ".sha256")


def _stage(ckpt: dict, variant: str, checkpoint: Path, staging: Path) -> tuple[Path, Path]:
    """Write the files that go into the archive; return (weights file, folder of extra files)."""
    weights = staging / "weights.pt"
    ensemble = "members" in ckpt
    # Tensors only (an ensemble: a list of state_dicts): loads with weights_only=True.
    torch.save({"members": ckpt["members"]} if ensemble else ckpt["state_dict"], weights)
    extra = staging / "extra"
    (extra / "training").mkdir(parents=True)
    (extra / "training" / "__init__.py").write_text('"""The served core packed from training/core/."""\n')
    shutil.copytree(CORE, extra / "training" / "core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (extra / "serving").mkdir()
    (extra / "serving" / "__init__.py").write_text('"""The worker code packed from serving/worker/."""\n')
    shutil.copytree(WORKER, extra / "serving" / "worker", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    meta = {
        "model_config": ckpt["model_config"],
        "class_names": ckpt["class_names"],
        "normalization": ckpt["normalization"],
        "variant": variant,
        # Calibrated confidence: the handler divides the logits by it. 1.0 for checkpoints trained
        # before temperature scaling existed (`python -m training.tools.trust` fits one afterwards).
        "temperature": float(ckpt.get("temperature", 1.0)),
        "metrics": {k: ckpt.get("metrics", {}).get(k) for k in ("test_accuracy", "val_accuracy", "epochs",
                                                                "test_ece_before", "test_ece_after",
                                                                "ood_test_false_rejection")},
        "provenance": ckpt.get("provenance", {}),
        "checkpoint": {"file": checkpoint.name, "sha256": sha256_of(checkpoint)},
    }
    if ckpt.get("ood"):  # the "not a digit" detector: its tensors in ood.pt, its settings in model.json
        detector = ckpt["ood"]
        torch.save({k: v for k, v in detector.items() if isinstance(v, torch.Tensor)}, extra / "ood.pt")
        meta["ood"] = {k: v for k, v in detector.items() if not isinstance(v, torch.Tensor)}
    if variant in ONNX_FILES:
        _export_variant(checkpoint, variant, extra)
    if variant in APPROXIMATE_VARIANTS:
        _write_self_check_digits(variant, extra / SELF_CHECK_FILE)
    if ensemble:  # the handler runs the members as one model (training/core/ensemble.py)
        meta["ensemble"] = {"members": len(ckpt["members"]), "temperatures": ckpt["temperatures"],
                            "model_configs": member_configs(ckpt),
                            "method": "grouped", "member_test_accuracy": ckpt["metrics"]["member_test_accuracy"]}
    (extra / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    (extra / "index_to_name.json").write_text(json.dumps(dict(enumerate(ckpt["class_names"]))) + "\n")
    return weights, extra


def _refuse_overwrites(target: Path, existing: str | None, version: str, keep_as: Path | None) -> None:
    """Without --force: never replace an archive of the same version, nor overwrite a kept one."""
    if target.exists() and existing in (version, None):
        raise ArchiveError(f"{target} (version {existing or 'unknown'}) already exists: pass --force to replace it")
    same = target.with_name(f"{target.stem}-{version}.mar")
    if same.exists():
        raise ArchiveError(f"version {version} is already kept as {same}: choose another version, or pass --force")
    if keep_as is not None and keep_as.exists():
        raise ArchiveError(f"{target} (version {existing}) would replace the kept {keep_as}: "
                           "pass --force to overwrite it")


def _replace_with(path: Path, write) -> None:
    """Create `path` by `write(tmp)` on a temporary name beside it, then one rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the same bytes under a second name, no copy
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(src, dst)


def _install(built: Path, target: Path, keep_as: Path | None) -> str:
    """Put `built` in place as `target` (keeping the old archive as `keep_as`); return its SHA-256.

    Every step renames a complete file into place, so `target` is a whole archive at every instant and
    a kept version is complete before the old archive is replaced. Two files cannot change in one
    rename: between the archive's rename and its checksum's (and its signature's, written next by
    `build_archive`), they disagree, and stay so if a last step fails; `make serve` refuses such a set
    rather than serve an archive it cannot vouch for.
    """
    digest = sha256_of(built)
    if keep_as is not None:
        _replace_with(keep_as, lambda tmp: _link_or_copy(target, tmp))
        recorded = _checksum_file(target)
        if recorded.exists():  # the digest recorded when it was built, under its new name
            old = recorded.read_text().split()[0]
            _replace_with(_checksum_file(keep_as), lambda tmp: tmp.write_text(f"{old}  {keep_as.name}\n"))
        else:  # a --force overwrite must not leave another archive's digest beside it
            _checksum_file(keep_as).unlink(missing_ok=True)
        if signature_path(target).exists():  # the signature covers the bytes, not the name
            _replace_with(signature_path(keep_as), lambda tmp: _link_or_copy(signature_path(target), tmp))
        else:
            signature_path(keep_as).unlink(missing_ok=True)
    _replace_with(target, lambda tmp: shutil.copyfile(built, tmp))
    _replace_with(_checksum_file(target), lambda tmp: tmp.write_text(f"{digest}  {target.name}\n"))
    return digest
def _export_variant(checkpoint: Path, variant: str, extra: Path) -> None:
    """The ONNX file the handler runs for `variant`; int8 is calibrated on MNIST training images."""
    from training.data import DataError
    from training.tools.export import ExportError, calibration_images, export_all

    try:
        calibration = calibration_images(None, 512) if variant == "int8" else None
        formats = ("int8-onnx",) if variant == "int8" else ("onnx",)
        export_all(checkpoint, extra, formats, calibration, log=lambda _: None)
    except (DataError, ExportError) as err:
        raise ArchiveError(f"variant {variant}: {err}") from None
    if variant == "int8":
        (extra / ONNX_FILES["onnx"]).unlink()  # the fp32 model it was quantised from: not served


# The worker compares an approximate variant with the fp32 model on these test digits before it serves.
SELF_CHECK_DIGITS = 512


def _write_self_check_digits(variant: str, path: Path) -> None:
    """A fixed sample of MNIST test digits (uint8, N×28×28) for the worker's load-time self-check."""
    import numpy as np

    from training.data import DataError, load_split

    try:
        images, _ = load_split(None, train=False)
    except DataError as err:
        raise ArchiveError(f"variant {variant}: its load-time self-check needs MNIST test digits: {err}") from None
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:SELF_CHECK_DIGITS]
    np.save(path, images[pick].numpy())


def build_archive(checkpoint: Path, model_store: Path, name: str, version: str, variant: str = ARCHIVE_DEFAULT_VARIANT,
                  force: bool = False, model_config: Path = MODEL_CONFIG, ensemble: bool = False) -> Archive:
    if variant not in VARIANTS:
        raise ArchiveError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if ensemble and variant == ARCHIVE_DEFAULT_VARIANT:  # auto picks among single-network runners
        variant = DEFAULT_VARIANT
    if ensemble and variant not in ("eager", "fused", "bf16"):
        raise ArchiveError(f"{variant} ensembles are not supported: the members run as one grouped torch model "
                           "(variants eager, fused or bf16)")
    ckpt = load_ensemble_checkpoint(checkpoint) if ensemble else load_checkpoint(checkpoint)
    target = model_store / f"{name}.mar"
    existing = archive_version(target) if target.exists() else None
    keep_as = model_store / f"{name}-{existing}.mar" if existing not in (version, None) else None
    if not force:
        _refuse_overwrites(target, existing, version, keep_as)
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnist-archive-") as tmp:
        staging = Path(tmp)
        weights, extra = _stage(ckpt, variant, checkpoint, staging)
        export = staging / "export"
        export.mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", version,
               "--serialized-file", str(weights), "--handler", str(HANDLER), "--extra-files", str(extra),
               "--config-file", str(model_config), "--export-path", str(export)]
        # The archiver stages files in $TMPDIR/<model-name> and deletes that folder first: a
        # private TMPDIR keeps two archive runs (or a user's own folder of that name) apart.
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {result.stderr.strip()[-500:]}")
        digest = _install(export / f"{name}.mar", target, keep_as)
    signer = sign_archive(target).signer
    forget_default(model_store, name)  # a promote or rollback recorded before: the new archive serves next
    return Archive(target, digest, target.stat().st_size, ckpt.get("metrics", {}).get("test_accuracy"), keep_as,
                   signer)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.archive", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--model-store", default="model_store", type=Path)
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--variant", default=ARCHIVE_DEFAULT_VARIANT, choices=VARIANTS,
                        help="load-time optimisation applied by the handler (default: "
                             f"{ARCHIVE_DEFAULT_VARIANT}, the fastest exact one timed at worker start)")
    parser.add_argument("--force", action="store_true", help="replace an archive of the same name and version")
    parser.add_argument("--model-config", default=MODEL_CONFIG, type=Path,
                        help="TorchServe per-model settings (configs/model-config-gpu.yaml on GPU hosts)")
    parser.add_argument("--ensemble", nargs="?", const=ENSEMBLE_DIR / "ensemble.pt", type=Path, default=None,
                        metavar="ENSEMBLE_PT", help="pack the members of `make train-ensemble` into this one .mar "
                        f"(default {ENSEMBLE_DIR / 'ensemble.pt'}; replaces --checkpoint)")
    args = parser.parse_args(argv)
    if args.ensemble is not None:
        args.checkpoint = args.ensemble
    try:
        archive = build_archive(args.checkpoint, args.model_store, args.model_name, args.version,
                                args.variant, args.force, args.model_config, ensemble=args.ensemble is not None)
    except (CheckpointError, ArchiveError, SignatureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    accuracy = "n/a" if archive.test_accuracy is None else f"{archive.test_accuracy:.2%}"
    print(f"archive        {archive.path}  (version {args.version}, variant {args.variant})")
    print(f"size           {archive.size / 1e6:.2f} MB")
    print(f"sha256         {archive.sha256}")
    print(f"signed by      key {archive.signer} ({signature_path(archive.path).name})")
    print(f"test accuracy  {accuracy} (recorded in {args.checkpoint})")
    if archive.replaced:
        print(f"previous version kept as {archive.replaced}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
