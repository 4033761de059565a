"""Train an ensemble: `make train-ensemble N=5`, `python -m training.recipes.ensemble_train --members 5`.

Member k is an ordinary training run with seed `seed + k` (its own weights, validation split,
augmentation and dropout draws) in `<out_dir>/member-k/`. A member whose model.pt was trained with
exactly that config is reused, so `N=3` then `N=5` trains two more and an interrupted run picks up
where it stopped. `--config` may be given several times: member k takes config k mod their count
(different configs in one ensemble, architectures included). The members are then scored together on the test set and
written as one checkpoint, `<out_dir>/ensemble.pt`, which `make archive ARGS=--ensemble` packs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from training import config as cfglib
from training.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    provenance,
    read_checkpoint_file,
)
from training.cli import ArgumentParser
from training.core.ensemble import EnsembleError, build_ensemble
from training.core.model import Net
from training.core.tensors import normalize
from training.data import DataError, data_dir, load_split
from training.loop import fit
from training.metrics import summarize
from training.run_options import RunOptions
from training.train_config import DEFAULT_CONFIG, TrainConfig, saved_base

DEFAULT_OUT = Path("artifacts") / "ensemble"


def member_config(base: TrainConfig, out_dir: Path, k: int) -> TrainConfig:
    return cfglib.apply(base, {"seed": base.seed + k, "out_dir": str(out_dir / f"member-{k}")})


def trained_with(cfg: TrainConfig) -> bool:
    """Whether <cfg.out_dir>/model.pt exists and was trained with exactly this config."""
    path = Path(cfg.out_dir) / "model.pt"
    try:
        if not path.is_file():
            return False
        saved = load_checkpoint(path)["train_config"]
    except (CheckpointError, KeyError):
        return False
    try:  # fields added since it was trained take their defaults (the architecture: as it was trained)
        saved = cfglib.to_dict(cfglib.apply(saved_base(), saved))
    except ValueError:
        return False
    # Where the data was read from and the outputs went do not change the model.
    ignored = {"data_dir": None, "out_dir": None}
    return {**saved, **ignored} == {**cfglib.to_dict(cfg), **ignored}


def load_ensemble_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an ensemble.pt written by this module."""
    path = Path(path)
    ckpt = read_checkpoint_file(path, f"no ensemble at {path}: run `make train-ensemble` first")
    if not isinstance(ckpt, dict) or not {"members", "model_config", "temperatures"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not an ensemble written by training.recipes.ensemble_train")
    return ckpt


def member_configs(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's model config (ensembles written before members could differ: the one for all)."""
    return ckpt.get("model_configs") or [ckpt["model_config"]] * len(ckpt["members"])


def ensemble_members(ckpt: dict[str, Any]) -> list[Net]:
    """The members of an ensemble checkpoint as eval-mode networks."""
    return [model_from_checkpoint({"model_config": config, "state_dict": state})
            for state, config in zip(ckpt["members"], member_configs(ckpt), strict=True)]


def temperature_of(ckpt: dict[str, Any]) -> float:
    """The member's calibration temperature (issue 13 stores it in the checkpoint), 1.0 if none."""
    value = ckpt.get("temperature", 1.0)
    return float(value.get("value", 1.0) if isinstance(value, dict) else value)


@torch.inference_mode()
def score_ensemble(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 1000) -> dict[str, Any]:
    """Accuracy and mean NLL of the averaged probabilities (the model returns their log)."""
    matrix = torch.zeros(10, 10, dtype=torch.int64)
    loss = 0.0
    for start in range(0, len(images), batch_size):
        log_p = model(normalize(images[start : start + batch_size]))
        y = labels[start : start + batch_size]
        loss += F.nll_loss(log_p, y, reduction="sum").item()
        matrix += torch.bincount(y * 10 + log_p.argmax(1), minlength=100).view(10, 10)
    return summarize(matrix, loss)


def wrong_in(predictions: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """(members, images) predicted digits → how many images exactly k members get wrong, k = 1..members:
    errors that only some members make, an average can outvote; those all make, it cannot."""
    wrong = (predictions != labels).sum(0)
    return torch.bincount(wrong, minlength=len(predictions) + 1)[1:].tolist()


@torch.inference_mode()
def member_predictions(members: Sequence[torch.nn.Module], images: torch.Tensor,
                       batch_size: int = 1000) -> torch.Tensor:
    """(members, images): each member's predicted digit for each uint8 image."""
    return torch.stack([torch.cat([m(normalize(images[i : i + batch_size])).argmax(1)
                                   for i in range(0, len(images), batch_size)]) for m in members])


def combine(paths: list[Path], data_dir: str, method: str = "grouped") -> dict[str, Any]:
    """Member checkpoints → one ensemble checkpoint, scored on the MNIST test set."""
    ckpts = [load_checkpoint(p) for p in paths]
    if len({tuple(c["class_names"]) for c in ckpts}) != 1:
        raise EnsembleError("members must share one class list")
    temperatures = [temperature_of(c) for c in ckpts]
    members = [model_from_checkpoint(c) for c in ckpts]
    model = build_ensemble(members, temperatures, method)
    x, y = load_split(data_dir, train=False)
    test = score_ensemble(model, x, y)
    overlap = wrong_in(member_predictions(members, x), y)
    return {
        "members": [c["state_dict"] for c in ckpts],
        "temperatures": temperatures,
        "model_config": ckpts[0]["model_config"],
        "model_configs": [c["model_config"] for c in ckpts],  # members may differ (training/core/ensemble.py)
        "normalization": ckpts[0]["normalization"],
        "class_names": ckpts[0]["class_names"],
        "member_files": [str(p) for p in paths],
        "train_configs": [c["train_config"] for c in ckpts],
        "metrics": {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "members": len(ckpts),
                    "member_test_accuracy": [c["metrics"]["test_accuracy"] for c in ckpts],
                    "test_wrong_in_k_members": overlap,  # [k=1, ..., k=members]
                    "val_accuracy": None, "epochs": ckpts[0]["metrics"].get("epochs")},
        "provenance": provenance(),
    }


def train_members(bases: list[TrainConfig], n: int, out_dir: Path, quiet: bool = False,
                  dry_run: bool = False, jobs: int = 1) -> list[Path]:
    """Train (or reuse) the members; with jobs > 1, that many at once, each in its own process."""
    configs, todo = [member_config(bases[k % len(bases)], out_dir, k) for k in range(n)], []
    for k, cfg in enumerate(configs):
        if trained_with(cfg):
            print(f"member {k}: reusing {cfg.out_dir}/model.pt (seed {cfg.seed})")
        elif jobs <= 1:
            print(f"member {k}: training seed {cfg.seed} into {cfg.out_dir}/")
            fit(cfg, RunOptions(quiet=quiet, dry_run=dry_run, force=True, run_name=f"ensemble-member-{k}"))
        else:
            todo.append((k, cfg))
    if todo:
        _train_concurrently(todo, jobs, dry_run)
    return [Path(cfg.out_dir) / "model.pt" for cfg in configs]


def _train_concurrently(todo: list[tuple[int, TrainConfig]], jobs: int, dry_run: bool) -> None:
    """`python -m training.train` per member, `jobs` at a time: one process cannot keep a GPU busy
    with a model this small (it waits on kernel launches), several can. Each member's exact config
    goes through a YAML file, so `trained_with` recognises the result; output goes to its train.log."""

    def train(k: int, cfg: TrainConfig) -> str | None:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "member.yaml").write_text(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
        cmd = [sys.executable, "-m", "training.train", "--config", str(out / "member.yaml"), "--quiet", "--force",
               *(["--dry-run"] if dry_run else [])]
        print(f"member {k}: training seed {cfg.seed} into {out}/", flush=True)
        with (out / "train.log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"member {k}: " + ("done" if code == 0 else f"FAILED (exit {code})"), flush=True)
        return None if code == 0 else f"member {k} (exit {code}; see {out}/train.log)"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [f for f in pool.map(lambda item: train(*item), todo) if f]
    if failed:
        raise EnsembleError("training failed for " + ", ".join(failed))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.recipes.ensemble_train", description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5, help="how many members (default 5)")
    parser.add_argument("--config", action="append", default=None,
                        help="train config (repeat for members with different configs; default configs/train.yaml)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--seed", type=int, default=0, help="member k trains with seed + k")
    parser.add_argument("--method", default="grouped", choices=("grouped", "vmap", "loop"))
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=None, metavar="MODEL_PT",
                        help="combine these trained checkpoints instead of training members")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many members at once, one process each (a GPU: up to --members)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="3 batches per epoch per member")
    args = parser.parse_args(argv)
    if args.members < 1:
        parser.error("--members must be at least 1")
    try:
        bases = []
        for path in args.config or [str(DEFAULT_CONFIG)]:
            cfg = cfglib.apply(TrainConfig(), cfglib.load_yaml(path))
            # $MNIST_DIR, where set, over the config file's data_dir (training/data.py: data_dir)
            overrides = {"data_dir": str(data_dir())} if "MNIST_DIR" in os.environ else {}
            bases.append(cfglib.apply(cfg, {"seed": args.seed, **overrides}))
        paths = args.checkpoints or train_members(bases, args.members, args.out_dir, quiet=args.quiet,
                                                  dry_run=args.dry_run, jobs=args.jobs)
        ensemble = combine(paths, bases[0].data_dir, args.method)
    except (ValueError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    target = args.out_dir / "ensemble.pt"
    atomic_save(ensemble, target)
    m = ensemble["metrics"]
    singles = ", ".join(f"{a:.2%}" for a in m["member_test_accuracy"])
    print(f"ensemble of {m['members']}: test accuracy {m['test_accuracy']:.2%} (members: {singles}); wrote {target}")
    overlap = ", ".join(f"{k}: {count}" for k, count in enumerate(m["test_wrong_in_k_members"], start=1))
    print(f"test digits wrong in k of the {m['members']} members (k: digits): {overlap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
