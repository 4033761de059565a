"""training.checkpoint.publish: which run becomes model.pt, and that the swap leaves a valid model.pt at
every instant. Tiny untrained checkpoints that claim their scores: no training needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import atomic_save, load_checkpoint, make_checkpoint, publish
from training.core.model import ModelConfig, Net

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import failing_replace  # noqa: E402

FULL_TEST = {"count": 10000, "sha256": "a" * 16}
SLICE_TEST = {"count": 100, "sha256": "b" * 16}
VAL = {"count": 5000, "sha256": "c" * 16}
OTHER_VAL = {"count": 5000, "sha256": "d" * 16}  # another seed's split: same size, other images


def checkpoint(val_accuracy: float, test_accuracy: float, val_set: dict | None = VAL,
               test_set: dict | None = FULL_TEST, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = Net(ModelConfig(conv1=4, conv2=8, hidden=16, dropout=0.0)).eval()
    metrics = {"val_accuracy": val_accuracy, "test_accuracy": test_accuracy}
    if val_set is not None:
        metrics["val_set"] = val_set
    if test_set is not None:
        metrics["test_set"] = test_set
    return make_checkpoint(model, config={}, metrics=metrics)


def published(tmp_path: Path, ckpt: dict) -> bytes:
    atomic_save(ckpt, tmp_path / "model.pt")
    return (tmp_path / "model.pt").read_bytes()


def test_first_run_is_published(tmp_path):
    message = publish(checkpoint(0.99, 0.99), tmp_path)
    assert message == f"wrote {tmp_path / 'model.pt'} (validation accuracy 99.00%)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_better_validation_score_replaces_model_pt_even_with_a_lower_test_score(tmp_path):
    # Runs are chosen on validation, never on the test set (which stays an unbiased final figure).
    old = published(tmp_path, checkpoint(0.990, 0.995))
    message = publish(checkpoint(0.992, 0.993, seed=1), tmp_path)
    assert message == (f"wrote {tmp_path / 'model.pt'} (validation accuracy 99.20%); previous (99.00%) kept as "
                       f"{tmp_path / 'model.prev.pt'}")
    assert (tmp_path / "model.prev.pt").read_bytes() == old
    assert load_checkpoint(tmp_path / "model.pt")["metrics"]["val_accuracy"] == 0.992


def test_a_lower_validation_score_is_kept_as_the_candidate(tmp_path):
    old = published(tmp_path, checkpoint(0.992, 0.990))
    message = publish(checkpoint(0.990, 0.999, seed=1), tmp_path)
    assert message == (f"kept {tmp_path / 'model.pt'} (validation accuracy 99.20%); this run scored 99.00% and was "
                       f"saved as {tmp_path / 'model.candidate.pt'} (pass --force to replace)")
    assert (tmp_path / "model.pt").read_bytes() == old
    assert load_checkpoint(tmp_path / "model.candidate.pt")["metrics"]["test_accuracy"] == 0.999


@pytest.mark.parametrize(("new", "reason"), [
    # Fault: a --test-limit 100 run that scores 100% replaced a full-test 99.5% model.pt.
    (checkpoint(1.0, 1.0, test_set=SLICE_TEST), "the runs were scored on different test sets (10000 images and 100)"),
    (checkpoint(1.0, 1.0, test_set={**FULL_TEST, "sha256": "e" * 16}),
     "the runs were scored on different test sets (10000 images each, other images)"),
    (checkpoint(1.0, 1.0, val_set=OTHER_VAL),
     "the runs were scored on different validation sets (5000 images each, other images)"),
    (checkpoint(1.0, 1.0, val_set={"count": 0, "sha256": "f" * 16}), "this run has no validation set"),
], ids=["test-limit", "test-data", "val-split", "no-val"])
def test_runs_scored_on_different_sets_are_not_compared(tmp_path, new, reason):
    old = published(tmp_path, checkpoint(0.995, 0.995))
    message = publish(new, tmp_path)
    assert message == (f"kept {tmp_path / 'model.pt'}: {reason}, so their accuracies do not compare; this run was "
                       f"saved as {tmp_path / 'model.candidate.pt'} (pass --force to replace)")
    assert (tmp_path / "model.pt").read_bytes() == old
    assert not (tmp_path / "model.prev.pt").exists()


def test_a_model_pt_that_records_no_sets_is_not_compared(tmp_path):
    # Written before the sets were recorded: what it was scored on is unknown.
    old = published(tmp_path, checkpoint(0.9, 0.9, val_set=None, test_set=None))
    message = publish(checkpoint(0.99, 0.99), tmp_path)
    assert message.startswith(f"kept {tmp_path / 'model.pt'}: it does not record which validation and test sets "
                              "scored it, so their accuracies do not compare;")
    assert (tmp_path / "model.pt").read_bytes() == old


def test_force_replaces_whatever_the_scores(tmp_path):
    old = published(tmp_path, checkpoint(0.995, 0.995))
    publish(checkpoint(0.5, 0.5, test_set=SLICE_TEST, seed=1), tmp_path, force=True)
    assert load_checkpoint(tmp_path / "model.pt")["metrics"]["val_accuracy"] == 0.5
    assert (tmp_path / "model.prev.pt").read_bytes() == old


def test_an_unreadable_model_pt_is_replaced_and_kept_for_inspection(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    message = publish(checkpoint(0.99, 0.99), tmp_path)
    assert message.endswith(f"previous (unreadable) kept as {tmp_path / 'model.prev.pt'}")
    assert (tmp_path / "model.prev.pt").read_bytes() == b"not a checkpoint"
    load_checkpoint(tmp_path / "model.pt")


# --- the swap: a failure at any step leaves a valid model.pt -------------------------------------------


@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_failure_between_the_steps_of_a_publish_leaves_a_valid_model_pt(tmp_path, monkeypatch, fail_on):
    old = published(tmp_path, checkpoint(0.990, 0.990))
    calls = failing_replace(monkeypatch, fail_on)
    with pytest.raises(OSError, match="injected"):
        publish(checkpoint(0.995, 0.995, seed=1), tmp_path)
    monkeypatch.undo()
    assert len(calls) == fail_on
    # model.pt is still the old model, complete: never missing, never half-written.
    assert (tmp_path / "model.pt").read_bytes() == old
    load_checkpoint(tmp_path / "model.pt")
    if (tmp_path / "model.prev.pt").exists():
        assert (tmp_path / "model.prev.pt").read_bytes() == old
    # No temporary file is left behind.
    assert {p.name for p in tmp_path.iterdir()} <= {"model.pt", "model.prev.pt"}
