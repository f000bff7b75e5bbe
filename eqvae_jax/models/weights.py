"""Flax weight directories: one Orbax checkpoint of a model's variables plus its constructor config as JSON.

Layout of a weights directory (what `python -m eqvae_jax.convert` writes and every `load(path)` reads):

    DST/config.json   {"format": "eqvae-jax-weights", "version": 1, "kind": "kl_vae", "config": {...}}
    DST/variables/    Orbax PyTree checkpoint of the model's variables, a nested dict of numpy arrays

Variables are addressed by '/'-joined NNX paths (e.g. "encoder/conv_in/kernel"). Loading is strict: a missing,
unexpected or mis-shaped variable is a `KeyMismatchError` that names it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx

FORMAT = "eqvae-jax-weights"
VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


class KeyMismatchError(ValueError):
    """Weights and model disagree; the message names every missing, unexpected and mis-shaped key."""

    def __init__(
        self,
        what: str,
        missing: list[str] = (),
        unexpected: list[str] = (),
        mismatched: list[tuple[str, tuple, tuple]] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [f"{what}: weights do not match the model."]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(
                f"  mis-shaped ({len(self.mismatched)}): "
                + ", ".join(f"{k} (weights {tuple(a)}, model {tuple(b)})" for k, a, b in self.mismatched)
            )
        super().__init__("\n".join(lines))


def path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flat_variables(model: nnx.Module, variable_type: type = nnx.Variable) -> dict[str, np.ndarray]:
    """All variables of `model` (of `variable_type`) as a flat {'a/b/c': numpy array} dict."""
    state = nnx.state(model, variable_type)
    return {path_key(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}


def variable_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} of every variable of `model` (works on `nnx.eval_shape` models: nothing allocated)."""
    return {path_key(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model))}


def check_shapes(
    what: str, got: Mapping[str, tuple], expected: Mapping[str, tuple], ignore_unexpected: bool = False
) -> None:
    """Raise KeyMismatchError naming every difference between two {key: shape} maps."""
    missing = [k for k in expected if k not in got]
    unexpected = [] if ignore_unexpected else [k for k in got if k not in expected]
    mismatched = [
        (k, tuple(got[k]), tuple(expected[k]))
        for k in expected
        if k in got and tuple(got[k]) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        raise KeyMismatchError(what, missing, unexpected, mismatched)


def assign_variables(model: nnx.Module, flat: Mapping[str, np.ndarray], what: str = "weights") -> None:
    """Strictly copy a flat {'a/b/c': array} dict into `model`'s variables (dtype follows the model)."""
    state = nnx.state(model)
    entries = list(nnx.to_flat_state(state))
    check_shapes(what, {k: np.shape(v) for k, v in flat.items()},
                 {path_key(p): v.get_value().shape for p, v in entries})
    for p, v in entries:
        value = v.get_value()
        v.set_value(jax.numpy.asarray(flat[path_key(p)], dtype=value.dtype))
    nnx.update(model, nnx.from_flat_state(entries))


def _local_checkpointer():
    """An Orbax PyTree checkpointer that involves this process only.

    Weights directories hold host numpy arrays and are read or written by one process at a time (the end-of-run
    export writes on process 0 only; every process loads initial weights on its own). Orbax's default
    checkpointer synchronises all processes of a multi-host job around each save/restore, which would wait
    forever for the processes that do not take part.
    """
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                 barrier_sync_key_prefix=f"weights_p{me}")
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                            multiprocessing_options=options)


def save_weights(dst: str | os.PathLike, kind: str, config: Mapping[str, Any], flat: Mapping[str, np.ndarray]) -> None:
    """Write a weights directory at `dst` (which must not exist yet; callers make it atomic)."""
    dst = os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    with _local_checkpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(dst), VARIABLES_DIR), nested)
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "kind": kind, "config": dict(config)}, f, indent=2)


def read_config(src: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(kind, constructor config) of a weights directory; clear errors for anything else."""
    path = os.path.join(os.fspath(src), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{src} is not an eqvae-jax weights directory (no {CONFIG_FILE}).")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an eqvae-jax weights config (format={meta.get('format')!r}).")
    return meta["kind"], meta["config"]


def load_weights(src: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """(kind, config, flat variables) of a weights directory, as numpy arrays on the host."""
    kind, config = read_config(src)
    with _local_checkpointer() as ckptr:
        nested = ckptr.restore(os.path.join(os.path.abspath(os.fspath(src)), VARIABLES_DIR))
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = np.asarray(node)

    walk(nested, "")
    return kind, config, flat


def load_model(src: str | os.PathLike, kind: str, build: Callable[[dict[str, Any]], ModuleT]) -> ModuleT:
    """Build a model of `kind` from a weights directory: `build(config)` then strict assignment."""
    got_kind, config, flat = load_weights(src)
    if got_kind != kind:
        raise ValueError(f"{src} holds a {got_kind!r} model, not {kind!r}.")
    model = build(config)
    assign_variables(model, flat, what=os.fspath(src))
    return model
