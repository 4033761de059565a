"""Hyperparameter search with Optuna: `make tune TRIALS=20`, `python -m training.recipes.tune --trials 20`.

Each trial is an ordinary `training.train.fit` run with some config fields drawn by Optuna's TPE
sampler; it is scored on its VALIDATION accuracy (the test split is never loaded: fit(score_test=False)).
After every epoch the trial reports that accuracy and a pruner (median by default, successive
halving with `--pruner halving`) may stop it from the second epoch on.

The study lives in an RDB storage: by default SQLite in `<out_dir>/tune/study.db`. Starting
`make tune` again continues the same study (load_if_exists); two processes started at once on the
same storage share it, each asking for the next trial; `--storage postgresql://user@host/db` lets
processes on several machines share one study, which is how Optuna scales out. `--trials N` is the
study's total of finished (complete or pruned) trials, so a resumed study runs only what is left.
Ctrl-C stops the running trial at its next training step and marks it FAIL (Optuna does that
before re-raising), which leaves the study consistent; a process killed outright leaves a RUNNING
trial that the heartbeat turns into FAIL.

At the end: `configs/tuned.yaml` (configs/train.yaml with the best trial's values; an ordinary
train config) and plots of the optimisation history and parameter importances in `<out_dir>/tune/`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml

from training import config as cfglib
from training.checkpoint import CheckpointError
from training.cli import ArgumentParser
from training.data import DataError
from training.loop import fit
from training.run_options import Hooks, RunOptions
from training.train_config import DEFAULT_CONFIG, TrainConfig, from_command_line

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """The search space: the trainer's own config fields that move validation accuracy on MNIST.

    - lr, weight_decay (log scale): the two values every recipe is most sensitive to.
    - schedule: one-cycle (today's default) against SGDR warm restarts with their period and growth.
    - label_smoothing, model.dropout, l1: the regularisers, which trade fit for generalisation.
    - rotate, shift, scale: augmentation strength; too little overfits, too much blurs 4/9 and 1/7.
    - batch_size: steps per epoch under a fixed epoch budget.
    Left out: the optimizer (nesterov SGD; Adam's learning rates live on another scale, and a joint
    range would waste a small budget), the architecture (the served model stays the same size), and
    epochs (the budget: `--epochs`, and tuned.yaml keeps the base config's epochs).
    """
    schedule = trial.suggest_categorical("schedule", ["onecycle", "cosine_restarts"])
    params: dict[str, Any] = {
        "schedule": schedule,
        "lr": trial.suggest_float("lr", 0.02, 0.4, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 2e-3, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "l1": trial.suggest_categorical("l1", [0.0, 1e-6, 1e-5]),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
        "rotate": trial.suggest_float("rotate", 0.0, 20.0),
        "shift": trial.suggest_float("shift", 0.0, 0.15),
        "scale": trial.suggest_float("scale", 0.0, 0.2),
        "model": {"dropout": trial.suggest_float("model.dropout", 0.0, 0.4)},
    }
    if schedule == "cosine_restarts":
        params["restart_period"] = trial.suggest_int("restart_period", 1, 3)
        params["restart_mult"] = trial.suggest_int("restart_mult", 1, 2)
    return params


GRACE_SECONDS = 120  # a RUNNING trial without a heartbeat for this long is failed by any process


def open_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study's RDB storage; two processes starting at once may race to create its tables."""
    import sqlalchemy.exc

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            # The heartbeat lets any process mark FAIL a trial whose process died without a word (SIGKILL).
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30,
                                              grace_period=GRACE_SECONDS)
        except sqlalchemy.exc.SQLAlchemyError:  # "table already exists": the other process won; retry
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def open_study(storage: str, name: str, pruner: str) -> optuna.Study:
    rdb = open_storage(storage)
    # Stop bad trials after epoch 2 (the first epoch of a one-cycle run is mostly warm-up).
    stop = optuna.pruners.SuccessiveHalvingPruner(min_resource=2) if pruner == "halving" else \
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    sampler = optuna.samplers.TPESampler(n_startup_trials=4)  # a small budget: model-based after 4
    return optuna.create_study(study_name=name, storage=rdb, load_if_exists=True, direction="maximize",
                               sampler=sampler, pruner=stop)


def enqueue_baseline(study: optuna.Study, base: TrainConfig) -> None:
    """Make the base config itself a trial (once per study): tuning is judged against it on equal budget."""
    if any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        return
    if base.schedule not in ("onecycle", "cosine_restarts") or base.l1 not in (0.0, 1e-6, 1e-5) or \
            base.batch_size not in (64, 128, 256):
        return  # outside the search space: nothing to compare on equal terms
    params = {k: getattr(base, k) for k in ("schedule", "lr", "weight_decay", "label_smoothing", "l1", "batch_size",
                                             "rotate", "shift", "scale")}
    params["model.dropout"] = base.model.dropout
    if base.schedule == "cosine_restarts":
        params.update(restart_period=base.restart_period, restart_mult=base.restart_mult)
    study.enqueue_trial(params, user_attrs={"baseline": True})


# Set by the first Ctrl-C. The handler does not raise: a KeyboardInterrupt raised wherever the main
# thread happens to be can land inside SQLAlchemy (a commit, or a garbage-collector callback that
# returns a connection to the pool) and leave a SQLite transaction open, whose lock then makes every
# later write, the heartbeat's and the trial's FAIL, wait and fail with "database is locked". The
# trial stops at its next training step instead (fit(..., Hooks(stop=...))), between storage calls. A second
# Ctrl-C ends the process at once, as a kill would: SQLite rolls back what it was writing, and the
# trial left RUNNING is failed by the heartbeat check of the next `make tune`.
INTERRUPTED = threading.Event()


def _on_sigint(signum: int, frame: Any) -> None:
    if INTERRUPTED.is_set():
        print(f"\nstopped at once: a trial left RUNNING is marked FAIL by the next `make tune` after "
              f"{GRACE_SECONDS} s without a heartbeat", file=sys.stderr, flush=True)
        os._exit(130)
    INTERRUPTED.set()
    print("\nCtrl-C: stopping the running trial at its next step (Ctrl-C again to stop at once)",
          file=sys.stderr, flush=True)


def _stop_if_interrupted(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if INTERRUPTED.is_set():  # Ctrl-C between two trials: start no other
        study.stop()


def objective(base: TrainConfig, trials_dir: Path, dry_run: bool):
    def run(trial: optuna.Trial) -> float:
        trial.set_user_attr("pid", os.getpid())  # which process ran it (the concurrency test reads it)
        cfg = cfglib.apply(base, {**suggest(trial), "out_dir": str(trials_dir / f"trial-{trial.number}")})

        def report(row: dict[str, Any]) -> None:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
            trial.report(row["val_accuracy"], row["epoch"])
            # After the last epoch there is nothing left to save: the trial completes whatever it scored.
            if row["epoch"] < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {row['val_accuracy']:.2%} at epoch {row['epoch']}")

        metrics = fit(cfg, RunOptions(quiet=True, dry_run=dry_run, score_test=False, run_name=f"trial-{trial.number}"),
                      Hooks(on_epoch=report, stop=INTERRUPTED.is_set))
        if INTERRUPTED.is_set():  # Ctrl-C after its last step: the trial was interrupted all the same
            raise KeyboardInterrupt
        trial.set_user_attr("train_seconds", metrics["train_seconds"])
        return metrics["val_accuracy"]

    return run


def write_tuned(study: optuna.Study, base_yaml: Path, output: Path, budget: dict[str, Any]) -> dict[str, Any]:
    """configs/train.yaml with the best trial's values: a full-size train config, not the trial's slice."""
    best = study.best_trial
    config = cfglib.load_yaml(base_yaml)
    # Four significant digits: the search is nowhere near that precise, and the file is read by people.
    params = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in best.params.items()}
    for key, value in cfglib.nest(params).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    if config.get("schedule") != "cosine_restarts":
        config.pop("restart_period", None)
        config.pop("restart_mult", None)
    cfglib.apply(TrainConfig(), config)  # the file must be a valid train config
    header = (f"# Written by `make tune` (training/recipes/tune.py) from {base_yaml.name} and the best trial of study "
              f"'{study.study_name}':\n# trial {best.number}, validation accuracy {best.value:.4%}, "
              f"{len(study.get_trials(states=FINISHED))} finished trials, each trained with {json.dumps(budget)}.\n"
              "# Train it with: make train CONFIG=configs/tuned.yaml\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return config


def write_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history and parameter importances as PNGs (importances need 2+ complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is flagged experimental
        for name, draw in (("optimization_history", plots.plot_optimization_history),
                           ("param_importances", plots.plot_param_importances)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:
                print(f"no {name} plot: {err}", file=sys.stderr)
                continue
            path = folder / f"{name}.png"
            figure = axes.get_figure(root=True)
            assert figure is not None  # optuna's plots draw on a figure of their own
            figure.savefig(path, dpi=100, bbox_inches="tight")
            matplotlib.pyplot.close(figure)
            written.append(path)
    return written


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m training.recipes.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should reach (default 20)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config (default configs/train.yaml)")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL (default sqlite:///<out_dir>/tune/study.db)")
    parser.add_argument("--study-name", default="mnist")
    parser.add_argument("--pruner", default="median", choices=("median", "halving"))
    parser.add_argument("--output", type=Path, default=Path("configs/tuned.yaml"), help="the tuned train config")
    parser.add_argument("--dry-run", action="store_true", help="3 batches per epoch per trial")
    cfglib.add_flags(parser, TrainConfig())
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat
    try:
        base = from_command_line(args, args.config)
        folder = Path(base.out_dir) / "tune"
        folder.mkdir(parents=True, exist_ok=True)
        study = open_study(args.storage or f"sqlite:///{folder / 'study.db'}", args.study_name, args.pruner)
        left = args.trials - len(study.get_trials(deepcopy=False, states=FINISHED))
        print(f"study '{args.study_name}': {args.trials - max(left, 0)}/{args.trials} trials finished; "
              f"running up to {max(left, 0)} more in process {os.getpid()}")
        if left > 0:
            enqueue_baseline(study, base)
            INTERRUPTED.clear()
            previous = signal.signal(signal.SIGINT, _on_sigint)
            try:
                study.optimize(objective(base, folder / "trials", args.dry_run), n_trials=left, catch=(),
                               callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=FINISHED),
                                          _stop_if_interrupted])
            finally:
                signal.signal(signal.SIGINT, previous)
            # Ctrl-C after the last step of a trial, which then finished: stop, unless the study is done.
            if INTERRUPTED.is_set() and len(study.get_trials(deepcopy=False, states=FINISHED)) < args.trials:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("\ninterrupted: the study is consistent (a trial that was running is marked FAIL); "
              "run `make tune` again to continue it", file=sys.stderr)
        return 130
    except (ValueError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return report(study, args, base, folder)
    except KeyboardInterrupt:
        print(f"\ninterrupted while writing {args.output} and the plots: run `make tune` again to write them",
              file=sys.stderr)
        return 130


def report(study: optuna.Study, args: argparse.Namespace, base: TrainConfig, folder: Path) -> int:
    try:
        best = study.best_trial
    except ValueError:
        print("no complete trial yet: nothing to write", file=sys.stderr)
        return 1
    budget = {k: v for k, v in cfglib.to_dict(base).items() if k in ("epochs", "train_limit", "val_size", "seed")}
    write_tuned(study, Path(args.config), args.output, budget)
    plots = write_plots(study, folder)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
    print(f"best trial {best.number}: validation accuracy {best.value:.2%} with {json.dumps(best.params)}")
    print(f"trials: {counts}; wrote {args.output}" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
