"""make tune: Optuna trials on a slice of MNIST. The test split is never read; two processes share one
SQLite study; Ctrl-C leaves it consistent and the next run resumes it; tuned.yaml is a train config.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import torch

from training import config as cfglib
from training import loop, schedules
from training import splits as splits_module
from training.recipes import tune
from training.run_files import HOLD_ENV, RELEASE_ENV
from training.run_options import Hooks
from training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
# Enough to run the whole trial path (two epochs, so the pruner gets a report to act on), not to learn;
# 2,560 images so that a batch of 256 still gives the one-cycle schedule its 5 steps (--dry-run runs 3).
TINY = ["--dry-run", "--epochs", "2", "--train-limit", "2560", "--val-size", "200", "--threads", "1",
        "--device", "cpu", "--batch-size", "32"]


def tune_args(tmp: Path, trials: int) -> list[str]:
    return ["--trials", str(trials), "--out-dir", str(tmp), "--output", str(tmp / "tuned.yaml"),
            "--data-dir", os.environ.get("MNIST_DIR") or str(ROOT / "data"), *TINY]


def load(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name="mnist", storage=f"sqlite:///{tmp / 'tune' / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_tuning_never_loads_the_test_split_and_writes_a_train_config(tmp_path, mnist_dir, monkeypatch):
    reads: list[bool] = []
    real = splits_module.load_split

    def recording(root, train):
        reads.append(train)
        return real(root, train=train)

    monkeypatch.setattr(splits_module, "load_split", recording)  # the trainer's one way to read MNIST
    assert tune.main(tune_args(tmp_path, 2)) == 0
    assert reads == [True, True]  # one training-split read per trial, never the test split

    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "COMPLETE"]
    tuned = cfglib.load_yaml(tmp_path / "tuned.yaml")
    cfg = cfglib.apply(TrainConfig(), tuned)  # a valid train config
    best = study.best_trial.params
    assert cfg.lr == float(f"{best['lr']:.4g}") and cfg.schedule == best["schedule"]
    assert cfg.model.dropout == float(f"{best['model.dropout']:.4g}")
    # The trials' budget (slice, epochs, device) stays out: the file trains at full size.
    assert cfg.epochs == TrainConfig().epochs and cfg.train_limit == 0 and cfg.device == "auto"
    assert {"optimization_history.png", "param_importances.png"} <= {p.name for p in (tmp_path / "tune").iterdir()}
    events = list((tmp_path / "tune" / "trials" / "trial-0" / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1  # each trial has its own TensorBoard run


def start(tmp: Path, trials: int, release: Path | None = None) -> subprocess.Popen:
    """`release`: each trial holds after epoch 1 until that file exists or Ctrl-C (training/train.py: HOLD_ENV)."""
    hold = {HOLD_ENV: "1", RELEASE_ENV: str(release)} if release is not None else {}
    return subprocess.Popen([sys.executable, "-m", "training.recipes.tune", *tune_args(tmp, trials)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **hold})


def trials_so_far(tmp: Path) -> list:
    """The study's trials; none while the tune process has not created the study yet."""
    if not (tmp / "tune" / "study.db").exists():
        return []
    try:
        return load(tmp).get_trials(deepcopy=False)
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the tables or the study are being created
        return []


def wait_for_trial(tmp: Path, process: subprocess.Popen, running: bool = False) -> None:
    """Until `process` has a trial in the study (a RUNNING one if `running`)."""
    deadline = time.monotonic() + 600
    while not any(t.user_attrs.get("pid") == process.pid and (t.state.name == "RUNNING" or not running)
                  for t in trials_so_far(tmp)):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.5)


@pytest.mark.slow
def test_two_processes_share_one_study_and_ctrl_c_leaves_it_consistent(tmp_path, mnist_dir):
    # The first holds inside its first trial until the second has taken one: both work on the study on any CPU.
    release = tmp_path / "release"
    first = start(tmp_path, 4, release)
    wait_for_trial(tmp_path, first, running=True)
    second = start(tmp_path, 4)
    wait_for_trial(tmp_path, second)
    release.touch()
    outputs = [p.communicate(timeout=900)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    study = load(tmp_path)
    trials = study.get_trials(deepcopy=False)
    # Four finished between them (a pruned trial is finished too: which ones the median pruner stops
    # depends on the sampled values); it prunes nothing before 3 trials complete (n_startup_trials).
    finished = states(study).count("COMPLETE") + states(study).count("PRUNED")
    assert finished >= 4 and states(study).count("COMPLETE") >= 3 and "RUNNING" not in states(study)
    assert {t.user_attrs["pid"] for t in trials} == {first.pid, second.pid}  # both worked on the one study
    assert sorted(t.number for t in trials) == list(range(len(trials)))

    # Ctrl-C in the middle of a trial: that trial becomes FAIL, nothing is left RUNNING.
    before = len(trials)
    third = start(tmp_path, before + 2, release=tmp_path / "never")  # holds in its first trial until Ctrl-C
    wait_for_trial(tmp_path, third, running=True)
    third.send_signal(signal.SIGINT)
    output = third.communicate(timeout=300)[0]
    # 130, or death by SIGINT (-2): CPython exits by the signal itself once a KeyboardInterrupt has passed
    # through code run by exec() (dataclasses builds __init__ that way, e.g. while triton imports),
    # even when the program caught it. A shell reports 130 for both.
    assert third.returncode in (130, -signal.SIGINT), output
    assert "study is consistent" in output
    after = states(load(tmp_path))
    assert after.count("FAIL") == 1 and "RUNNING" not in after

    # Started again, it resumes the same study and runs only the trials still missing.
    fourth = start(tmp_path, before + 2)
    output = fourth.communicate(timeout=900)[0]
    assert fourth.returncode == 0, output
    final = states(load(tmp_path))
    assert final.count("COMPLETE") + final.count("PRUNED") == before + 2 and "RUNNING" not in final


def test_a_stop_request_ends_the_epoch_before_its_next_step():
    """Ctrl-C in `make tune` only sets a flag; training raises KeyboardInterrupt at its next step."""
    from training.core.model import ModelConfig, Net
    from training.distributed import Dist

    cfg = cfglib.apply(TrainConfig(), {"device": "cpu", "batch_size": 32, "schedule": "none", "augment": False})
    images = torch.zeros(320, 28, 28, dtype=torch.uint8)
    labels = torch.zeros(320, dtype=torch.long)
    model = Net(ModelConfig(conv1=4, conv2=8, hidden=16))
    opt = schedules.build_optimizer(model, cfg)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3  # false before steps 1-3, true before step 4

    with pytest.raises(KeyboardInterrupt):
        loop.train_epoch(model, opt, None, loop.Splits(images, labels, images[:0], labels[:0], images[:0],
                                                         labels[:0]), cfg, Dist(), 1, torch.Generator(),
                          show=False, dry_run=False, hooks=Hooks(stop=stop))
    assert len(steps) == 3


def test_the_first_ctrl_c_sets_the_flag_without_raising_and_the_second_ends_the_process(monkeypatch, capsys):
    monkeypatch.setattr(tune, "INTERRUPTED", type(tune.INTERRUPTED)())
    exits = []
    monkeypatch.setattr(tune.os, "_exit", exits.append)
    tune._on_sigint(signal.SIGINT, None)  # no KeyboardInterrupt in the middle of a SQLite commit
    assert tune.INTERRUPTED.is_set() and exits == []
    tune._on_sigint(signal.SIGINT, None)  # as a kill: no Python code runs, none can be left half-done
    assert exits == [130]
    assert "stopped at once" in capsys.readouterr().err
