"""Checkpoints: atomic writes, provenance, and the rule that a good model is never replaced silently."""

from __future__ import annotations

import os
import platform
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.model import Net, build_model
from training.preprocess import MNIST_MEAN, MNIST_STD

CLASS_NAMES = [str(d) for d in range(10)]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours."""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, str]:
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary name and rename, so an interrupted save never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint_file(path: Path, missing: str, advice: str = "retrain it") -> Any:
    """The one way checkpoint files are read: present, intact (zip CRC-32s), weights only (no pickled code).

    `missing` is the whole message for an absent file; `advice` ends the message for a damaged one.
    """
    if not path.is_file():
        raise CheckpointError(missing)
    try:  # torch.load skips the zip's CRC-32s: a flipped bit in the weights would load silently
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile):
        damaged = None  # not a zip at all: torch.load below says so
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupt ({damaged} fails its CRC-32 check); {advice}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); {advice}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by `training.train`."""
    path = Path(path)
    ckpt = read_checkpoint_file(path, f"no checkpoint at {path}: run `make train` first")
    if not isinstance(ckpt, dict) or not {"state_dict", "model_config"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by training.train")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> Net:
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def make_checkpoint(model: Net, config: dict, metrics: dict) -> dict[str, Any]:
    return {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_config": dict(vars(model.config)),
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
        "class_names": CLASS_NAMES,
        "train_config": config,
        "metrics": metrics,
        "provenance": provenance(),
    }


def publish(ckpt: dict[str, Any], out_dir: Path, force: bool = False) -> str:
    """Write `model.pt` unless a better one is already there; return a sentence saying what happened.

    The replaced model is kept as `model.prev.pt`; a worse new one is kept as `model.candidate.pt`.
    """
    target = out_dir / "model.pt"
    new_acc = ckpt["metrics"]["test_accuracy"]
    if target.exists():
        try:
            old_acc = load_checkpoint(target)["metrics"]["test_accuracy"]
        except (CheckpointError, KeyError):
            old_acc = None  # unreadable: replacing it loses nothing, but keep the file for inspection
        if old_acc is not None and new_acc < old_acc and not force:
            candidate = out_dir / "model.candidate.pt"
            atomic_save(ckpt, candidate)
            return (
                f"kept {target} (test accuracy {old_acc:.2%}); this run scored {new_acc:.2%} and was "
                f"saved as {candidate} (pass --force to replace)"
            )
        os.replace(target, out_dir / "model.prev.pt")
        atomic_save(ckpt, target)
        before = "unreadable" if old_acc is None else f"{old_acc:.2%}"
        return f"wrote {target} (test accuracy {new_acc:.2%}); previous ({before}) kept as {out_dir / 'model.prev.pt'}"
    atomic_save(ckpt, target)
    return f"wrote {target} (test accuracy {new_acc:.2%})"
