"""training.config with TrainConfig: defaults < YAML < flags, typed values, unknown keys are errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from training import config as cfglib
from training import train
from training.config import ConfigError, apply
from training.core.model import ModelConfig
from training.train_config import DEFAULT_CONFIG, TrainConfig


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cfglib.add_flags(parser, TrainConfig())
    return parser.parse_args(argv)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("updates", "name"),
    [({"bogus": 1}, "bogus"), ({"model": {"bogus": 1}}, "model.bogus"), ({"learning_rate": 0.1}, "learning_rate")],
)
def test_an_unknown_key_is_an_error_that_names_it(updates, name):
    with pytest.raises(ConfigError, match=f"^unknown config key '{name}' \\(known: "):
        apply(TrainConfig(), updates)


def test_the_error_for_an_unknown_nested_key_lists_the_nested_fields():
    with pytest.raises(ConfigError) as err:
        apply(TrainConfig(), {"model": {"bogus": 1}})
    assert str(err.value).endswith("(known: batch_norm, conv1, conv2, convs, dropout, hidden, num_classes, pool_first)")


@pytest.mark.parametrize(
    ("updates", "field", "expected"),
    [
        ({"epochs": "3"}, "epochs", 3),
        ({"epochs": "1e2"}, "epochs", 100),
        ({"epochs": 4.0}, "epochs", 4),
        ({"lr": "0.1"}, "lr", 0.1),
        ({"lr": "1e-3"}, "lr", 0.001),
        ({"lr": 1}, "lr", 1.0),
        ({"augment": "false"}, "augment", False),
        ({"augment": "off"}, "augment", False),
        ({"augment": "Yes"}, "augment", True),
        ({"optimizer": "adam"}, "optimizer", "adam"),
        ({"epochs": "1E2"}, "epochs", 100),
    ],
)
def test_values_are_coerced_to_the_field_type(updates, field, expected):
    value = getattr(apply(TrainConfig(), updates), field)
    assert value == expected and type(value) is type(expected)


def test_nested_values_are_coerced_too():
    cfg = apply(TrainConfig(), {"model": {"dropout": "0.25", "batch_norm": "false", "conv1": "16"}})
    assert cfg.model == ModelConfig(dropout=0.25, batch_norm=False, conv1=16, pool_first=True)
    assert cfg.epochs == TrainConfig().epochs  # untouched fields keep their defaults


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"epochs": "three"}, "epochs: expected int, got 'three'"),
        ({"epochs": 2.5}, "epochs: expected an integer, got 2.5"),
        ({"epochs": True}, "epochs: expected int, got True"),
        ({"lr": "fast"}, "lr: expected float, got 'fast'"),
        ({"augment": "maybe"}, "augment: expected true/false, got 'maybe'"),
        ({"augment": 1}, "augment: expected true/false, got 1"),
        ({"model": 3}, "model: expected a mapping, got 3"),
        ({"model": {"conv1": "wide"}}, "model.conv1: expected int, got 'wide'"),
    ],
)
def test_values_of_the_wrong_type_are_errors_naming_the_field(updates, message):
    with pytest.raises(ConfigError) as err:
        apply(TrainConfig(), updates)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"optimizer": "adagrad"}, "optimizer must be one of sgd, nesterov, adam, adamw, got 'adagrad'"),
        ({"schedule": "step"}, "schedule must be one of onecycle, cosine, cosine_restarts, plateau, none, got 'step'"),
        ({"device": "tpu"}, "device must be one of auto, cuda, mps, cpu, got 'tpu'"),
        ({"epochs": 0}, "epochs, batch_size and lr must be positive"),
        ({"lr": -0.1}, "epochs, batch_size and lr must be positive"),
        ({"val_size": -1}, "val_size, train_limit and test_limit must be >= 0"),
        ({"warmup": 1.0}, "warmup is a fraction of the steps in (0, 1), got 1.0"),
    ],
)
def test_validate_rejects_bad_values_naming_the_field(updates, message):
    with pytest.raises(ConfigError) as err:
        apply(TrainConfig(), updates)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("updates", "message"),
    [({"epochs": "2.5e0"}, "^epochs: expected an integer"), ({"lr": "nan"}, "^lr: "), ({"lr": "inf"}, "^lr: ")],
    ids=["2.5e0-epochs", "nan-lr", "inf-lr"],
)
def test_numbers_that_are_not_whole_or_not_finite_are_refused(updates, message):
    with pytest.raises(ConfigError, match=message):
        apply(TrainConfig(), updates)


def test_bad_model_values_are_rejected_on_apply():
    with pytest.raises(ValueError, match=r"^model.dropout must be in \[0, 1\), got 1.0$"):
        apply(TrainConfig(), {"model": {"dropout": 1.0}})


def test_defaults_then_yaml_then_flags(tmp_path):
    path = write_yaml(tmp_path / "train.yaml", {"epochs": 3, "lr": 0.05, "model": {"dropout": 0.3, "hidden": 64}})
    cfg = cfglib.from_args(TrainConfig(), parse_flags("--epochs", "5", "--model.dropout", "0.2",
                                                      "--batch-size", "32"), path)
    assert (cfg.epochs, cfg.batch_size, cfg.model.dropout) == (5, 32, 0.2)  # flags win
    assert (cfg.lr, cfg.model.hidden) == (0.05, 64)  # the YAML beats the defaults
    assert (cfg.momentum, cfg.model.conv1) == (TrainConfig().momentum, 32)  # defaults fill the rest


def test_flags_alone_apply_to_the_defaults():
    cfg = cfglib.from_args(TrainConfig(), parse_flags("--train-limit", "100", "--augment", "false"), None)
    assert cfg == TrainConfig(train_limit=100, augment=False)


def test_a_missing_or_malformed_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file not found: "):
        cfglib.load_yaml(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"expected a mapping at the top level$"):
        cfglib.load_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfglib.load_yaml(tmp_path / "broken.yaml")


def test_the_shipped_train_yaml_loads_into_train_config():
    shipped = cfglib.load_yaml(DEFAULT_CONFIG)
    cfg = apply(TrainConfig(), shipped)
    for key, value in shipped.items():
        if key == "model":
            assert all(getattr(cfg.model, k) == v for k, v in value.items())
        else:
            assert getattr(cfg, key) == value, key


def test_an_unknown_flag_is_one_line_naming_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model.dropuot", "0.2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "python -m training.train: error: unrecognized arguments: --model.dropuot 0.2 (did you mean "
        "--model.dropout?); `python -m training.train --help` lists the options\n")
    with pytest.raises(SystemExit):
        train.main(["--bogus-flag"])
    assert capsys.readouterr().err.count("\n") == 1  # no 20-line usage first, no made-up suggestion
    from serving import cli  # every command line of the project uses the same parser

    with pytest.raises(SystemExit):
        cli.main(["strat"])
    err = capsys.readouterr().err
    assert err.startswith("python -m serving.cli: error: argument command: invalid choice: 'strat'") and \
        err.count("\n") == 1
    from serving import lifecycle

    with pytest.raises(SystemExit):  # a flag of the top level given after the subcommand
        lifecycle.main(["deploy", "2", "--model-name", "mnist"])
    assert "(--model-name goes before the command)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a subcommand's flag, mistyped
        cli.main(["start", "--model-api", "on", "--forground"])
    assert "(did you mean --foreground?)" in capsys.readouterr().err


def test_an_unknown_yaml_key_makes_main_print_one_line_and_return_2(tmp_path, capsys):
    path = write_yaml(tmp_path / "train.yaml", {"epochs": 1, "bogus": 1})
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'bogus' (known: ")
    assert err.count("\n") == 1


CONFIGS = Path(__file__).parent.parent / "configs"
# Every YAML file in configs/ is a train config except TorchServe's (metrics, model-config*) and
# `make audit`'s allow-list (accepted-risks).
NOT_TRAIN = ("metrics.yaml", "accepted-risks.yaml")
TRAIN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml")
                       if p.name not in NOT_TRAIN and not p.name.startswith("model-config"))


def test_the_train_configs_are_found():
    assert {"train.yaml", "tuned.yaml", "ensemble-member.yaml", "ensemble-wide.yaml",
            "ensemble-deep.yaml"} <= set(TRAIN_CONFIGS)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_shipped_train_config_loads(name):
    # `make train CONFIG=configs/<name>` must not fail on an unknown key or a bad value.
    cfg = cfglib.apply(TrainConfig(), cfglib.load_yaml(CONFIGS / name))
    cfg.model.validate()


def test_a_run_saved_before_pool_first_resumes_and_finetunes_with_batch_norm_before_the_pool(tmp_path):
    """Finetune, --resume and ensemble reuse rebuild a run from its saved train_config: one saved before
    `model.pool_first` existed holds weights for batch norm before the pool, whatever today's default is."""
    from training.run_files import resume_config
    from training.train_config import saved_base

    old = cfglib.to_dict(TrainConfig())
    del old["model"]["pool_first"]
    assert TrainConfig().model.pool_first  # today's default
    assert cfglib.apply(saved_base(), old).model.pool_first is False
    assert resume_config(tmp_path / "last.pt", old, TrainConfig(), {}).model.pool_first is False
    assert cfglib.apply(saved_base(), cfglib.to_dict(TrainConfig())).model.pool_first is True
