"""Typed (frozen dataclass) configs from ml_collections sections or plain dicts, with unknown fields an error."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_section(cls: type[T], section: Mapping[str, Any] | Any) -> T:
    """`cls(**section)` where section is a ConfigDict or mapping whose keys must all be fields of `cls`."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}.")
    return cls(**d)
