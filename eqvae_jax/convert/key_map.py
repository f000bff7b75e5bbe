"""Strict, explicit key maps between a Flax model's flat variables and a PyTorch state dict.

Every converter describes its architecture as rows (Flax key, PyTorch key, layout) and lets `KeyMap` do the
rest, so strictness and error messages are the same for every model:

    km = KeyMap([Row("encoder/conv_in/kernel", "encoder.conv_in.weight", "conv"), ...], depth=cfg.depth)
    flat = km.to_flax(state_dict, flax_shapes, what=src)     # KeyMismatchError names every bad key
    state_dict = km.to_torch(flat, flax_shapes)

Layouts: 'conv' (PyTorch OIHW <-> Flax HWIO), 'linear' ((out, in) <-> (in, out)), None (unchanged). A PyTorch
key containing '{i}' is one tensor per layer i < depth, stacked along a new leading Flax axis (scanned blocks).
The expected PyTorch shapes are derived from the Flax model's own shapes, so a map cannot silently disagree
with the model it describes (rows that do not cover the model exactly are an error too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from eqvae_jax.models.weights import KeyMismatchError, check_shapes

LAYOUTS = (None, "conv", "linear")


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor: its '/'-joined Flax path, its PyTorch name (may contain '{i}') and its layout."""

    flax: str
    torch: str
    layout: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"Row {self.flax}: layout must be one of {LAYOUTS}, got {self.layout!r}.")

    @property
    def stacked(self) -> bool:
        return "{i}" in self.torch


def to_flax_layout(value: np.ndarray, layout: str | None) -> np.ndarray:
    """One PyTorch tensor in Flax layout."""
    if layout == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if layout == "linear":
        return np.transpose(value)
    return value


def to_torch_layout(value: np.ndarray, layout: str | None) -> np.ndarray:
    """One Flax tensor in PyTorch layout."""
    if layout == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if layout == "linear":
        return np.transpose(value)
    return value


def _torch_shape(flax_shape: tuple[int, ...], layout: str | None) -> tuple[int, ...]:
    return tuple(to_torch_layout(np.empty(flax_shape, np.bool_), layout).shape) if layout else tuple(flax_shape)


class KeyMap:
    """Rows of one architecture (see the module docstring); `depth` expands the '{i}' rows."""

    def __init__(self, rows: Iterable[Row | tuple[str, str] | tuple[str, str, str | None]], depth: int = 0):
        self.rows = tuple(r if isinstance(r, Row) else Row(*r) for r in rows)
        self.depth = depth
        flax_keys = [r.flax for r in self.rows]
        if len(set(flax_keys)) != len(flax_keys):
            raise ValueError("KeyMap: a Flax key appears in more than one row.")

    def _torch_names(self, row: Row) -> list[str]:
        return [row.torch.format(i=i) for i in range(self.depth)] if row.stacked else [row.torch]

    def torch_keys(self) -> list[str]:
        return [name for row in self.rows for name in self._torch_names(row)]

    def torch_shapes(self, flax_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """{PyTorch key: shape} expected for a model whose variables have `flax_shapes`."""
        self._check_covers(flax_shapes)
        out = {}
        for row in self.rows:
            shape = tuple(flax_shapes[row.flax])
            if row.stacked:
                if shape[0] != self.depth:
                    raise ValueError(f"KeyMap: {row.flax} has {shape[0]} layers, the map {self.depth}.")
                shape = shape[1:]
            for name in self._torch_names(row):
                out[name] = _torch_shape(shape, row.layout)
        return out

    def _check_covers(self, flax_shapes: Mapping[str, tuple[int, ...]]) -> None:
        mapped = {r.flax for r in self.rows}
        missing, extra = sorted(set(flax_shapes) - mapped), sorted(mapped - set(flax_shapes))
        if missing or extra:
            raise KeyMismatchError("key map vs model (a bug in the converter)", missing=missing, unexpected=extra)

    def to_flax(self, state_dict: Mapping[str, np.ndarray], flax_shapes: Mapping[str, tuple[int, ...]],
                what: str = "state dict") -> dict[str, np.ndarray]:
        """Flat float32 Flax variables from `state_dict`; every missing, unexpected or mis-shaped key is named."""
        check_shapes(what, {k: np.shape(v) for k, v in state_dict.items()}, self.torch_shapes(flax_shapes))
        flat = {}
        for row in self.rows:
            parts = [to_flax_layout(np.asarray(state_dict[n], np.float32), row.layout) for n in self._torch_names(row)]
            flat[row.flax] = np.ascontiguousarray(np.stack(parts) if row.stacked else parts[0])
        return flat

    def to_torch(self, flat: Mapping[str, np.ndarray], flax_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 what: str = "Flax weights") -> dict[str, np.ndarray]:
        """A float32 PyTorch state dict from flat Flax variables (checked against `flax_shapes` when given)."""
        if flax_shapes is not None:
            self._check_covers(flax_shapes)
            check_shapes(what, {k: np.shape(v) for k, v in flat.items()}, flax_shapes)
        out = {}
        for row in self.rows:
            value = np.asarray(flat[row.flax], np.float32)
            names = self._torch_names(row)
            parts = [value[i] for i in range(len(names))] if row.stacked else [value]
            for name, part in zip(names, parts, strict=True):
                out[name] = np.ascontiguousarray(to_torch_layout(part, row.layout))
        return out


def describe_skipped(keys: list[str], grouped: bool = True, limit: int = 6) -> str:
    """Skipped source keys for a summary line: grouped by their first two dotted components ('loss.logvar (1),
    loss.discriminator.* (12)'), or the first `limit` names themselves."""
    if not grouped:
        return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    groups: dict[str, int] = {}
    for name in keys:
        parts = name.split(".")
        group = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[group] = groups.get(group, 0) + 1
    items = [f"{g} ({c})" for g, c in sorted(groups.items())]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more groups)" if len(items) > limit else "")
