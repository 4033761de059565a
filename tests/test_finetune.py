"""Fine-tuning on stored corrections: the split, the verdict, the user-style set, and a tiny real run
through `fit` with its provenance and compare report."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from training.checkpoint import CheckpointError, load_checkpoint
from training.feedback.models import NOT_A_DIGIT, Feedback
from training.feedback.store import Correction, FeedbackStore
from training.feedback.style import user_set, user_style
from training.recipes.finetune import FinetuneError, FinetuneOptions, finetune, split_feedback
from training.recipes.finetune_report import NO_GO, compare, verdict
from training.recipes.finetune_report import main as report_main

pytest_plugins = ["serving_fixtures"]


def rows(labels: list[int]) -> list[Feedback]:
    return [Feedback(id=i + 1, label=label, image=bytes(784), created_at=datetime.now(UTC)) for i, label in
            enumerate(labels)]


def test_the_split_is_seeded_disjoint_and_never_trains_on_not_a_digit():
    feedback = rows([3, NOT_A_DIGIT, 5, 7, NOT_A_DIGIT, 1, 2, 9, 0, 4])
    train, held = split_feedback(feedback, 0.2, seed=0)
    assert len(held) == 2 and not {r.id for r in train} & {r.id for r in held}
    assert all(r.label != NOT_A_DIGIT for r in train)
    assert {r.id for r in train} | {r.id for r in held} >= {r.id for r in feedback if r.label != NOT_A_DIGIT}
    assert split_feedback(feedback, 0.2, seed=0) == (train, held)  # the same rows every time
    assert split_feedback(feedback, 0.0, seed=0)[1] == []


def side(mnist: float, feedback: float | None) -> dict:
    return {"mnist": {"accuracy": mnist}, "feedback": {} if feedback is None else {"accuracy": feedback}}


@pytest.mark.parametrize(("base", "candidate", "go"), [
    (side(0.9943, 0.80), side(0.9933, 0.90), True),  # exactly 0.1 point lower on MNIST: allowed
    (side(0.9943, 0.80), side(0.9932, 0.95), False),  # 0.11 point lower: refused, however good on feedback
    (side(0.9943, 0.80), side(0.9950, 0.79), False),  # worse on the held-out feedback
    (side(0.9943, None), side(0.9950, None), False),  # nothing held out: nothing to judge on
])
def test_the_verdict_needs_both_mnist_and_the_held_out_feedback(base, candidate, go):
    assert verdict({"base": base, "candidate": candidate})[0] is go


def test_the_user_style_is_slanted_deterministic_and_mnist_formatted(mnist_dir):
    from training.data import load_split

    images, labels = load_split(str(mnist_dir), train=False)
    one = images[0].numpy()  # a 7
    styled = user_style(one)
    assert styled.shape == (28, 28) and styled.dtype == np.uint8
    assert np.array_equal(styled, user_style(one))
    ink = styled > 128

    def centre_x(part: np.ndarray) -> float:
        return float((part.sum(0) * np.arange(28)).sum() / part.sum())

    assert centre_x(ink[:14]) > centre_x(ink[14:]) + 1  # the top leans right
    assert ink.sum() < (one > 128).sum()  # a thinner pen
    x, y, index = user_set(images[:50].numpy(), labels[:50].numpy())
    assert np.array_equal(y, labels[:50].numpy()[index]) and len(set(index.tolist())) == len(x)


@pytest.mark.slow
def test_finetune_writes_a_candidate_with_provenance_and_a_report(mnist_dir, tmp_path, trained_checkpoint, capsys):
    from training.data import load_split

    images, labels = load_split(str(mnist_dir), train=False)
    x, y, _ = user_set(images[:40].numpy(), labels[:40].numpy())
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    with pytest.raises(FinetuneError, match="no digit corrections"):
        finetune(trained_checkpoint, store.rows(), tmp_path / "run", FinetuneOptions(), str(mnist_dir), "cpu")
    for image, label in zip(x, y, strict=True):
        store.add(Correction(image.tobytes(), "mnist", "1.0", 0, 0.5, True, int(label), "test"))
    store.add(Correction(np.full((28, 28), 9, np.uint8).tobytes(), "mnist", "1.0", 1, 0.4, True, NOT_A_DIGIT, "test"))
    options = FinetuneOptions(epochs=1, holdout=0.25, freeze_convs=True, seed=3)
    result = finetune(trained_checkpoint, store.rows(), tmp_path / "run", options, str(mnist_dir), "cpu",
                      base_version="1.0", dry_run=True)
    candidate = load_checkpoint(tmp_path / "run" / "model.pt")
    done = candidate["finetune"]
    assert done == result["finetune"] and done["base_version"] == "1.0" and done["seed"] == 3
    assert len(done["feedback_holdout_ids"]) == 10 and len(done["feedback_train_ids"]) <= 31
    assert not set(done["feedback_train_ids"]) & set(done["feedback_holdout_ids"])
    assert done["options"]["freeze_convs"] is True
    base = load_checkpoint(trained_checkpoint)
    for name, tensor in base["state_dict"].items():  # frozen convolutions: their weights are the base's
        if name.startswith("features") and name.endswith("weight") and tensor.dim() == 4:
            assert np.array_equal(tensor.numpy(), candidate["state_dict"][name].numpy()), name
    report = compare(trained_checkpoint, tmp_path / "run" / "model.pt", store, str(mnist_dir))
    assert report["held_out_rows"] == 10 and report["base"]["feedback"]["count"] == 10
    assert {"accuracy", "ece", "is_digit_rate"} <= report["candidate"]["mnist"].keys()
    code = report_main(["--base", str(trained_checkpoint), "--candidate", str(tmp_path / "run" / "model.pt"),
                        "--db", url, "--data-dir", str(mnist_dir)])
    assert code == (0 if report["go"] else NO_GO)
    assert ("GO: promote it" if report["go"] else "NO-GO: keep the base") in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="no finetune provenance"):
        compare(trained_checkpoint, trained_checkpoint, store, str(mnist_dir))
    store.close()
