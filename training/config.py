"""Typed, shallow configuration: dataclasses with defaults, YAML for what users change, CLI for the rest.

Every field of a config dataclass is a command-line flag of the same name (`--lr 0.01`,
`--model.dropout 0.2`); YAML files and flags go through the same checks, and an unknown key
is an error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from training.cli import ArgumentParser  # noqa: F401  (config users build their parsers with it)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A config file or flag that cannot be applied (unknown key, wrong type, bad value)."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or say why not."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if kind is str:
        return str(value)
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if kind is int and not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return kind(number)
    raise ConfigError(f"{key}: unsupported field type {kind!r}")  # pragma: no cover - a programming error


def apply(obj: T, updates: dict[str, Any], prefix: str = "") -> T:
    """Return a copy of dataclass `obj` with `updates` (nested dicts for nested dataclasses) applied."""
    types_ = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in types_:
            known = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key '{name}' (known: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
            changes[key] = apply(typing.cast(Any, current), value, prefix=f"{name}.")
        else:
            changes[key] = _coerce(value, types_[key], name)
    new = dataclasses.replace(obj, **changes)
    check = getattr(new, "validate", None)
    if check is not None:
        check()
    return new


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, prefix=f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (`model.dropout`, as flags and Optuna name them) → the nested form configs use."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def add_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """Add one `--name VALUE` flag per config field; values stay strings until `apply` checks them."""
    group = parser.add_argument_group("config overrides (any field of the config file)")
    for dotted, value in _flatten(defaults).items():
        flag = "--" + dotted.replace("_", "-")
        group.add_argument(flag, dest=f"cfg:{dotted}", default=None, metavar=type(value).__name__.upper())


def from_args(defaults: T, args: argparse.Namespace, config_path: str | Path | None) -> T:
    """Defaults in code, then the YAML file, then command-line flags."""
    cfg = defaults
    if config_path is not None:
        cfg = apply(cfg, load_yaml(config_path))
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return apply(cfg, nest(flags))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
