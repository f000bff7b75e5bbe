"""What every converter checks the same way: the target format, the destination, and `--extra KEY=VALUE` options.

A converter module declares `TARGETS` ("flax" first) and `OPTIONS` ({name: parser of a string}); its
`convert(src, dst, to, overwrite, **options)` starts with

    check_target(KIND, to, TARGETS); check_destination(dst, overwrite); opts = typed_options(KIND, options, OPTIONS)

so the command line (strings) and Python callers (typed values or strings) get the same validation, and an
existing destination fails before a large source is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from eqvae_jax import storage

Parser = Callable[[str], Any]


class UsageError(ValueError):
    """A wrong --to or --extra: the command line exits with status 2 (conversion failures exit with 1)."""


def parse_bool(value: str) -> bool:
    v = str(value).lower()
    if v not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"expected true/false, got {value!r}")
    return v in ("1", "true", "yes")


def parse_int_tuple(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(value).split(",") if v.strip())


def check_target(kind: str, to: str, targets: tuple[str, ...]) -> None:
    if to not in targets:
        raise UsageError(f"--kind {kind} converts --to one of {', '.join(targets)}, not {to!r}.")


def check_destination(dst: str, overwrite: bool) -> None:
    """An existing `dst` is an error unless `overwrite` (checked before any source is read)."""
    if not overwrite and epath.Path(dst).exists():  # local or gs://
        raise FileExistsError(f"{storage.resolve(dst)} already exists; pass --overwrite to replace it.")


def typed_options(kind: str, options: Mapping[str, Any], parsers: Mapping[str, Parser]) -> dict[str, Any]:
    """Options parsed by their parser (strings only; typed values pass); unknown names are an error."""
    unknown = sorted(set(options) - set(parsers))
    if unknown:
        valid = ", ".join(sorted(parsers)) or "none"
        raise UsageError(f"unknown --extra option(s) {', '.join(unknown)} for --kind {kind}; valid: {valid}.")
    out = {}
    for name, value in options.items():
        try:
            out[name] = parsers[name](value) if isinstance(value, str) else value
        except ValueError as e:
            raise UsageError(f"--extra {name}={value!r}: {e}") from e
    return out


def dataclass_parsers(cls: type) -> dict[str, Parser]:
    """A parser per field of a config dataclass, from its annotation (bool, int, float, str, tuple[int, ...])."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Parser] = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
        if hint is bool:
            out[field.name] = parse_bool
        elif origin is tuple:
            out[field.name] = parse_int_tuple
        elif hint in (int, float, str):
            out[field.name] = hint
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no option parser for {hint}")
    return out


def split_extra(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'} (the command line's --extra values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--extra expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out
