"""make distill: the student learns from a model.pt or an ensemble.pt, with and without augmentation."""

from __future__ import annotations

import json

import pytest
import torch

from training.checkpoint import atomic_save, load_checkpoint
from training.core.model import ModelConfig, Net
from training.recipes import distill
from training.recipes.ensemble_train import combine

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import save_tiny_checkpoint  # noqa: E402


@pytest.mark.parametrize("augment", [False, True])
def test_distill_writes_a_student_and_both_runs_per_seed(tmp_path, mnist_dir, augment):
    teacher = save_tiny_checkpoint(tmp_path / "model.pt")
    args = ["--teacher", str(teacher), "--out", str(tmp_path / "out"), "--seeds", "1", "--epochs", "1",
            "--train-limit", "2000", "--data-dir", str(mnist_dir), "--dry-run"] + (["--augment"] if augment else [])
    assert distill.main(args) == 0
    summary = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert [r["distilled"] for r in summary["runs"]] == [False, True]
    assert summary["augment"] is augment
    student = load_checkpoint(tmp_path / "out" / "student.pt")
    assert student["model_config"]["conv1"] == distill.STUDENT.conv1


def test_the_student_widths_are_an_option(tmp_path, mnist_dir, capsys):
    teacher = save_tiny_checkpoint(tmp_path / "model.pt")
    assert distill.main(["--teacher", str(teacher), "--out", str(tmp_path / "out"), "--seeds", "1", "--epochs", "1",
                         "--train-limit", "2000", "--data-dir", str(mnist_dir), "--dry-run",
                         "--student", "8,12,16"]) == 0
    config = load_checkpoint(tmp_path / "out" / "student.pt")["model_config"]
    assert (config["conv1"], config["conv2"], config["hidden"]) == (8, 12, 16)
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["student"]["hidden"] == 16
    assert distill.main(["--teacher", str(teacher), "--out", str(tmp_path / "more"), "--seeds", "2", "--first-seed",
                         "3", "--epochs", "1", "--train-limit", "2000", "--data-dir", str(mnist_dir), "--dry-run",
                         "--student", "8,12,16"]) == 0  # more seeds later, without redoing the first ones
    runs = json.loads((tmp_path / "more" / "distill.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [3, 3, 4, 4]
    for bad in ("8,12", "8,x,16", "8,0,16"):
        with pytest.raises(SystemExit):
            distill.main(["--teacher", str(teacher), "--student", bad])
        assert "--student" in capsys.readouterr().err


def test_an_ensemble_teaches_with_its_averaged_probabilities(tmp_path, mnist_dir):
    members = [save_tiny_checkpoint(tmp_path / f"m{k}.pt", seed=k) for k in range(2)]
    atomic_save(combine(members, str(mnist_dir)), tmp_path / "ensemble.pt")
    teacher, config, params = distill.load_teacher(tmp_path / "ensemble.pt")
    single, _, one = distill.load_teacher(members[0])
    assert params == 2 * one and config == single.config
    log_p = teacher(torch.zeros(3, 1, 28, 28))
    assert torch.allclose(log_p.exp().sum(1), torch.ones(3), atol=1e-5)  # log-probabilities: softmax is identity
    assert distill.main(["--teacher", str(tmp_path / "ensemble.pt"), "--out", str(tmp_path / "out"), "--seeds", "1",
                         "--epochs", "1", "--train-limit", "2000", "--data-dir", str(mnist_dir), "--dry-run",
                         "--augment"]) == 0


def test_a_missing_teacher_is_one_line(tmp_path, capsys):
    assert distill.main(["--teacher", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 1
    assert "no teacher at" in capsys.readouterr().err


@pytest.mark.parametrize("config", [ModelConfig(), distill.STUDENT, ModelConfig(conv1=8, conv2=16, hidden=32, convs=2)],
                         ids=["default", "student", "two-convs"])
def test_the_multiply_accumulate_count_matches_the_layers_a_forward_runs(config):
    counted = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            counted.append(output.numel() * module.in_channels // module.groups * module.kernel_size[0] ** 2)
        elif isinstance(module, torch.nn.Linear):
            counted.append(module.in_features * module.out_features)

    model = Net(config).eval()
    for module in model.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert distill.multiply_accumulates(config) == sum(counted)
