"""Checkpoints: atomic writes, provenance, and the rule that a good model is never replaced silently."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.core.inputs.preprocess import MNIST_MEAN, MNIST_STD
from training.core.model import Net, build_model

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


def _incomparable(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why two runs' accuracies cannot be compared, or None when both were scored on the same sets.

    `val_set` and `test_set` in a checkpoint's metrics are {count, sha256} of the images and labels
    that scored it (recorded by training.train); a --test-limit or another seed's split changes them.
    """
    if "val_set" not in old or "test_set" not in old:
        return "it does not record which validation and test sets scored it"
    for key, name in (("val_set", "validation"), ("test_set", "test")):
        if not new.get(key, {}).get("count"):
            return f"this run has no {name} set"
        a, b = old[key], new[key]
        if a["count"] != b["count"]:
            return f"the runs were scored on different {name} sets ({a['count']} images and {b['count']})"
        if a["sha256"] != b["sha256"]:
            return f"the runs were scored on different {name} sets ({a['count']} images each, other images)"
    return None


def _swap_in(ckpt: dict[str, Any], target: Path, keep_as: Path) -> None:
    """Make `ckpt` the new `target`, the old one `keep_as`, leaving a valid `target` at every instant.

    The new file is written completely first; the old one gets its second name by a hard link (a copy
    where links are not supported) renamed over `keep_as`; then one rename replaces `target`. A failure
    at any step leaves the old `target` in place and no temporary file behind.
    """
    new_tmp = target.with_name(f".{target.name}.new-{os.getpid()}")
    old_tmp = keep_as.with_name(f".{keep_as.name}.tmp-{os.getpid()}")
    try:
        torch.save(ckpt, new_tmp)
        try:
            os.link(target, old_tmp)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(target, old_tmp)
        os.replace(old_tmp, keep_as)
        os.replace(new_tmp, target)
    finally:
        for leftover in (new_tmp, old_tmp):
            leftover.unlink(missing_ok=True)


class Published(str):
    """`publish`'s sentence, and whether this run became a candidate (the model.pt there was kept)."""

    candidate: bool

    def __new__(cls, sentence: str, candidate: bool = False) -> Published:
        result = super().__new__(cls, sentence)
        result.candidate = candidate
        return result


def publish(ckpt: dict[str, Any], out_dir: Path, force: bool = False) -> Published:
    """Write `model.pt` unless the one already there is better; return a sentence saying what happened.

    Runs are compared by validation accuracy (the test set stays an unbiased final figure, never a
    criterion), and only when both were scored on the same validation and test sets. The replaced
    model is kept as `model.prev.pt`; a new one that is worse or not comparable is kept as
    `model.candidate.pt`. `force` replaces regardless.
    """
    target = out_dir / "model.pt"
    new = ckpt["metrics"]
    if not target.exists():
        atomic_save(ckpt, target)
        return Published(f"wrote {target} (validation accuracy {new['val_accuracy']:.2%})")
    try:
        old: dict[str, Any] | None = load_checkpoint(target)["metrics"]
    except (CheckpointError, KeyError):
        old = None  # unreadable: replacing it loses nothing, but keep the file for inspection
    if old is not None and not force:
        candidate = out_dir / "model.candidate.pt"
        reason = _incomparable(old, new)
        if reason is not None:
            atomic_save(ckpt, candidate)
            return Published(f"kept {target}: {reason}, so their accuracies do not compare; this run was saved "
                             f"as {candidate} (pass --force to replace)", candidate=True)
        if new["val_accuracy"] < old["val_accuracy"]:
            atomic_save(ckpt, candidate)
            return Published(f"kept {target} (validation accuracy {old['val_accuracy']:.2%}); this run scored "
                             f"{new['val_accuracy']:.2%} and was saved as {candidate} (pass --force to replace)",
                             candidate=True)
    previous = out_dir / "model.prev.pt"
    _swap_in(ckpt, target, previous)
    before = "unreadable" if old is None else f"{old.get('val_accuracy', float('nan')):.2%}"
    return Published(f"wrote {target} (validation accuracy {new['val_accuracy']:.2%}); previous ({before}) "
                     f"kept as {previous}")
