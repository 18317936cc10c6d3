"""Configs as dataclasses: YAML files and `a.b=value` overrides parsed into them, or command-line flags made
from them; ranges checked and unknown keys named before anything runs.

A field's rules (and its help, for a flag) ride on the field itself: `ranged(default, min=, gt=, max=,
choices=, help=)`. Used by training (train/config.py) and the data jobs (synth/config.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from cir.errors import CIRError


class ConfigError(CIRError, ValueError):
    """A config file or override that does not fit the dataclasses; the message names the key."""


REQUIRED = dataclasses.MISSING  # ranged(REQUIRED, ...): a field without a default


def ranged(default: Any, *, min: Any = None, gt: Any = None, max: Any = None, choices: tuple = (),
           item_gt: Any = None, help: Optional[str] = None) -> Any:
    """A field whose value `from_dict` checks before anything runs: `min <= v`, `v > gt`, `v <= max`,
    `v in choices`, and for a list every item `> item_gt` (None values are not checked). `help` is its flag's
    help text (add_arguments). `REQUIRED` as the default: the field has none (a required flag, a missing key is
    an error)."""
    rules = {"min": min, "gt": gt, "max": max, "choices": choices, "item_gt": item_gt, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


def _check_range(value: Any, rules: dict, where: str) -> None:
    if value is None or not rules:
        return
    if rules["min"] is not None and value < rules["min"]:
        raise ConfigError(f"{where}: must be at least {rules['min']}, got {value!r}")
    if rules["gt"] is not None and value <= rules["gt"]:
        raise ConfigError(f"{where}: must be greater than {rules['gt']}, got {value!r}")
    if rules["max"] is not None and value > rules["max"]:
        raise ConfigError(f"{where}: must be at most {rules['max']}, got {value!r}")
    if rules["choices"] and value not in rules["choices"]:
        raise ConfigError(f"{where}: one of {', '.join(map(str, rules['choices']))}, got {value!r}")
    if rules["item_gt"] is not None:
        bad = [v for v in value if v <= rules["item_gt"]]
        if bad:
            raise ConfigError(f"{where}: every item must be greater than {rules['item_gt']}, got {value!r}")


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def from_dict(cls, data: dict, where: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    kwargs = {name: _coerce(value, _field_type(cls, name), f"{where}.{name}") for name, value in data.items()}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            _check_range(kwargs[f.name], dict(f.metadata), f"{where}.{f.name}")
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case). YAML 1.1 also reads yes/no/on/off
    as booleans, so `mixed_precision: no` (Accelerate's own word) arrived as False and was refused."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str) -> Any:
    """A config's YAML (files and key=value overrides alike), booleans as YAML 1.2 has them."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_with_data(cls, path: Optional[str], overrides: list[str] = ()) -> tuple[Any, dict]:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML: numbers, lists, null) -> (the config,
    the keys that were given)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = load_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top")
    apply_overrides(data, overrides)
    return from_dict(cls, data), data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set each `a.b=value` override (the value parsed as YAML: numbers, lists, null) in a config's raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not a YAML value ({err.problem}); quote patterns with braces, "
                              f"e.g. data.train=['shards-{{000..009}}.tar']") from None
        _set_path(data, key.strip(), value)
    return data


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_config(cls, path: Optional[str], overrides: list[str] = ()):
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML: numbers, lists, null)."""
    return load_with_data(cls, path, overrides)[0]


# ------------------------------------------------------------------------------------------ command lines

def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_arguments(parser, cls, required: tuple[str, ...] = ()) -> None:
    """One flag per field of a flat dataclass (`shard_size` -> `--shard-size`), typed by its annotation, with
    the field's default, and `help` and `choices` from its ranged() metadata; fields without a default and those
    in `required` are required flags; a bool field is `--name` / `--no-name`, a list[str] or list[float] one
    `--name A B`; a config's own fields come before those of its bases. Read the values back with from_args,
    which checks the ranges."""
    own = cls.__dict__.get("__annotations__", {})
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        tp = _field_type(cls, f.name)
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
            typing.Union, types.UnionType) else [tp]
        kwargs: dict = {"help": f.metadata.get("help")}
        if typing.get_origin(inner[0]) is list and typing.get_args(inner[0]) in ((str,), (float,)):
            kwargs["nargs"] = "+"  # `--name A B ...`
            inner = list(typing.get_args(inner[0]))
        if inner[0] not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: add_arguments makes flags of int, float, str, bool, "
                            f"list[str] and list[float] fields only")
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if inner[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif inner[0] in (int, float):
            kwargs["type"] = inner[0]
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in required or no_default:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if inner[0] is not bool and kwargs["default"] not in (None, "", []):  # bool flags say theirs already
                kwargs["help"] = f"{kwargs['help'] or ''} (default: %(default)s)".lstrip()
        parser.add_argument(_flag(f.name), **kwargs)


def from_args(cls, args):
    """The dataclass from parsed flags (add_arguments); ConfigError names the flag whose value is out of range."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        _check_range(values[f.name], dict(f.metadata), _flag(f.name))
    return cls(**values)
