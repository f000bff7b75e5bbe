"""Job configs as frozen, typed dataclasses, parsed once from an ml_collections ConfigDict.

A job describes its config schema as (nested) frozen dataclasses whose field defaults are the reference
values. `default_config(Schema)` turns the schema into a ConfigDict with every key present (so config files
can set any of them and `--config.a.b=v` overrides work); `parse(Schema, config)` turns a ConfigDict back
into the typed schema: that parse is the validation. Every problem is collected before anything is raised:
an unknown key gets a "did you mean" suggestion, a value of the wrong type names its dotted path.

Field types understood: bool, int, float, str, tuple[T, ...] (from a list or tuple), X | None, dict (free-form
mapping, e.g. model overrides) and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
from ml_collections import ConfigDict, config_dict

T = TypeVar("T")


class ConfigError(ValueError):
    """The job config is wrong; raised before any model is built or compiled, listing every problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)  # a str: one problem
        super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(hint: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _default_value(hint: Any, value: Any) -> Any:
    inner, nullable = _optional(hint)
    if value is None and nullable:
        return config_dict.placeholder(inner if inner in (int, float, str, bool) else object)
    if dataclasses.is_dataclass(value):
        return default_config(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return ConfigDict(dict(value))
    return value


def default_config(schema: Any) -> ConfigDict:
    """A ConfigDict with every field of `schema` (a dataclass type or instance) at its default value."""
    instance = schema() if isinstance(schema, type) else schema
    hints = _hints(type(instance))
    return ConfigDict({f.name: _default_value(hints[f.name], getattr(instance, f.name))
                       for f in dataclasses.fields(instance)})


def _plain(section: Any) -> Any:
    if isinstance(section, ConfigDict):
        return section.to_dict()
    if isinstance(section, config_dict.FieldReference):
        return section.get()
    return section


def _coerce(hint: Any, value: Any, where: str, problems: list[str]) -> Any:
    inner, nullable = _optional(hint)
    if value is None:
        if not nullable:
            problems.append(f"{where} must not be None")
        return None
    if dataclasses.is_dataclass(inner):
        return _parse(inner, value, where, problems)
    origin = typing.get_origin(inner)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            problems.append(f"{where} must be a list, got {value!r}")
            return value
        item = typing.get_args(inner)[0]
        return tuple(_coerce(item, v, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if inner is dict or origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{where} must be a mapping, got {value!r}")
            return {}
        return dict(value)
    if inner is bool:
        if not isinstance(value, bool | int) or value not in (0, 1):
            problems.append(f"{where} must be true or false, got {value!r}")
        return bool(value)
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            problems.append(f"{where} must be an integer, got {value!r}")
            return value
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where} must be a number, got {value!r}")
            return value
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            problems.append(f"{where} must be a string, got {value!r}")
        return value
    return value


def _parse(cls: type[T], section: Any, where: str, problems: list[str], noun: str = "key") -> T:
    section = _plain(section)
    if not isinstance(section, Mapping):
        problems.append(f"{where or 'config'} must be a section (mapping), got {section!r}")
        return cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    values = {}
    for key, value in section.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown {noun} '{prefix}{key}'{hint}")
            continue
        before = len(problems)
        coerced = _coerce(hints[key], _plain(value), f"{prefix}{key}", problems)
        if len(problems) == before:  # an ill-typed value is reported and the default kept, for further checks
            values[key] = coerced
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a schema's own __post_init__ checks: report, keep the defaults
        problems.append(f"{where or 'config'}: {e}")
        return cls()


def parse_collect(cls: type[T], section: Any, where: str = "") -> tuple[T, list[str]]:
    """(`cls` from a ConfigDict/mapping, problems): unknown or ill-typed keys and sections that fail their own
    checks are reported and replaced by defaults, so that further (semantic) checks can still run."""
    problems: list[str] = []
    return _parse(cls, section, where, problems), problems


def parse(cls: type[T], section: Any, where: str = "") -> T:
    """`cls` from a ConfigDict/mapping: missing keys take the defaults; every problem raises one ConfigError."""
    out, problems = parse_collect(cls, section, where)
    if problems:
        raise ConfigError(problems)
    return out


def from_section(cls: type[T], section: Mapping[str, Any] | Any) -> T:
    """`cls(**section)` for a flat section whose keys must all be fields of `cls` (ValueError otherwise)."""
    problems: list[str] = []
    out = _parse(cls, section, cls.__name__, problems, noun="field")
    if problems:
        raise ValueError("; ".join(problems))
    return out


def positive(*named: tuple[str, float]) -> list[str]:
    """'NAME must be positive, got V' for each (dotted name, value) that is zero or negative."""
    return [f"{name} must be positive, got {value}" for name, value in named if value <= 0]


def to_json_dict(config: ConfigDict | Any) -> dict:
    """The config (ConfigDict or dataclass) as plain JSON data, for checkpoints and config.json."""
    if dataclasses.is_dataclass(config):
        return json_ready(dataclasses.asdict(config))
    return json_ready(ml_collections.ConfigDict(config).to_dict())


def json_ready(value: Any) -> Any:
    """Tuples as lists, recursively (what a JSON round trip gives back)."""
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def dotted(data: Mapping[str, Any], key: str) -> Any:
    """data['a']['b'] for key 'a.b' (None where a level is missing)."""
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def parse_arg(arg: str, /, choices: Mapping[str, Any] | None = None, **defaults: Any) -> types.SimpleNamespace:
    """A config file's variant string, e.g. 'model=XL/2,objective=sit,tiny', against typed defaults.

    `key=value` sets a known key (parsed as its default's type); a bare `key` sets a bool default to True;
    `choices` ({key: allowed values}) restricts a key's values. Unknown keys and values are one ConfigError
    naming the known ones (with "did you mean" for a close one).
    """
    choices = choices or {}
    values = dict(defaults)
    problems = []
    for item in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, raw = item.partition("=")
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"unknown config variant {key!r} ({hint}known: {', '.join(sorted(defaults))})")
            continue
        kind = type(defaults[key])
        if not sep:
            if kind is not bool:
                problems.append(f"config variant {key!r} needs a value ({key}=...)")
            values[key] = True
        elif kind is bool:
            values[key] = raw.lower() in ("1", "true", "yes")
        else:
            try:
                values[key] = kind(raw)
            except ValueError:
                problems.append(f"config variant {key}={raw!r} is not a {kind.__name__}")
                continue
        if key in choices and values[key] not in choices[key]:
            known = sorted(map(str, choices[key]))
            close = difflib.get_close_matches(str(values[key]), known, n=1)
            hint = f"did you mean {key}={close[0]}? " if close else ""
            problems.append(f"unknown value of config variant {key}: {raw!r} ({hint}known: {', '.join(known)})")
    if problems:
        raise ConfigError(problems)
    return types.SimpleNamespace(**values)
