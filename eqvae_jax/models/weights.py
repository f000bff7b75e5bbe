"""Flax weight directories: one Orbax checkpoint of a model's variables plus its constructor config as JSON.

Layout of a weights directory (what `python -m eqvae_jax.convert` writes and every `load(path)` reads):

    DST/config.json   {"format": "eqvae-jax-weights", "version": 1, "kind": "kl_vae", "config": {...}}
    DST/variables/    Orbax PyTree checkpoint of the model's variables, a nested dict of numpy arrays

Variables are addressed by '/'-joined NNX paths (e.g. "encoder/conv_in/kernel"). Loading is strict: a missing,
unexpected or mis-shaped variable is a `KeyMismatchError` that names it.

Every model module (models.kl_vae, vq_vae, dit, maskgit, dinov2, lpips, discriminator, eval.inception) gets the
same four functions from `model_api`:

    build(config=None, *, seed=0) -> Module       random weights (config: the config dataclass or its dict)
    abstract(config=None) -> Module               shape-only variables, nothing allocated
    load(path, **overrides) -> Module             a weights directory; overrides replace stored config fields
    save(model, path) -> None                     write a weights directory (`path` must not exist)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import numpy as np
from flax import nnx

from eqvae_jax import storage
from eqvae_jax.memo import cached_when_hashable
from eqvae_jax.typed_config import from_section, to_json_dict

FORMAT = "eqvae-jax-weights"
VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"

ModuleT = TypeVar("ModuleT", bound=nnx.Module)
ConfigT = TypeVar("ConfigT")


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
    from etils import epath

    path = epath.Path(storage.resolve(src)) / CONFIG_FILE  # local or gs://
    if not path.is_file():
        raise FileNotFoundError(f"{src} is not an eqvae-jax weights directory (no {CONFIG_FILE}).")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an eqvae-jax weights config (format={meta.get('format')!r}).")
    return meta["kind"], meta["config"]


def load_weights(src: str | os.PathLike, kind: str | None = None) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """(kind, config, flat variables) of a weights directory, as numpy arrays on the host; with `kind`, a
    directory holding another kind of model is a ValueError."""
    got_kind, config = read_config(src)
    if kind is not None and got_kind != kind:
        raise ValueError(f"{os.fspath(src)} holds a {got_kind!r} model, not {kind!r}.")
    with _local_checkpointer() as ckptr:
        nested = ckptr.restore(os.path.join(storage.resolve(src), VARIABLES_DIR))
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = np.asarray(node)

    walk(nested, "")
    return got_kind, config, flat


def load_model(src: str | os.PathLike, kind: str, build: Callable[[dict[str, Any]], ModuleT]) -> ModuleT:
    """Build a model of `kind` from a weights directory: `build(config)` then strict assignment."""
    _, config, flat = load_weights(src, kind)
    model = build(config)
    assign_variables(model, flat, what=os.fspath(src))
    return model


# ------------------------------------------------------------------------------------------ the model API


class ModelAPI(NamedTuple, Generic[ConfigT, ModuleT]):
    """The four functions every model module exports (see the module docstring)."""

    build: Callable[..., ModuleT]
    abstract: Callable[..., ModuleT]
    load: Callable[..., ModuleT]
    save: Callable[[ModuleT, str | os.PathLike], None]


def _config_of(model: Any) -> Any:
    return model.config


@cached_when_hashable(maxsize=64)  # an unhashable config is traced each time
def _abstract_parts(new: Callable[[Any, nnx.Rngs], nnx.Module], config: Any) -> tuple[Any, nnx.State]:
    # The Rngs comes in as an argument: created inside, its counter is a value traced in the constructor, and
    # flax's every draw then asks that tracer for a sharding, whose error message walks the whole trace so far
    # (quadratic in the model's size; 0.52 -> 0.34 s for SD-VAE's).
    return nnx.split(nnx.eval_shape(lambda rngs: new(config, rngs), nnx.Rngs(0)))


def abstract_model(new: Callable[[ConfigT, nnx.Rngs], ModuleT], config: ConfigT) -> ModuleT:
    """`new(config, rngs)` with shape-only variables, traced once per (constructor, config) in a process.

    Tracing a constructor's random initialisers is most of what building an abstract model costs (0.8 s for
    SD-VAE's); a job, its evaluation and its sampler ask for the same models again. Each call returns a fresh
    module (its own Variables, so callers may assign into it) merged from the cached graph and shapes; a config
    that cannot be hashed is traced every time."""
    graphdef, state = _abstract_parts(new, config)
    return nnx.merge(graphdef, state, copy=True)


def model_api(
    kind: str,
    config_cls: type[ConfigT],
    new: Callable[[ConfigT, nnx.Rngs], ModuleT],
    *,
    init: Callable[[ConfigT, int], ModuleT] | None = None,
    random_variables: Callable[[ConfigT, int], Mapping[str, np.ndarray]] | None = None,
    config_of: Callable[[ModuleT], ConfigT] = _config_of,
    load_overrides: Collection[str] | None = None,
) -> ModelAPI[ConfigT, ModuleT]:
    """`build, abstract, load, save` of the model `new(config, rngs)` whose weights directories say `kind`.

    Random weights (`build`) come from `init(config, seed)` if given, else from `random_variables(config, seed)`
    (a flat {path: array} dict assigned into the abstract model), else from `new(config, nnx.Rngs(seed))`.
    `config_of(model)` is the config `save` stores (default `model.config`). `load_overrides` limits which
    config fields `load` may override (default: any field).
    """
    if init is not None and random_variables is not None:
        raise ValueError("model_api: give init or random_variables, not both")

    def as_config(config: ConfigT | Mapping[str, Any] | None) -> ConfigT:
        if config is None:
            return config_cls()
        return config if isinstance(config, config_cls) else from_section(config_cls, config)

    def abstract(config: ConfigT | Mapping[str, Any] | None = None) -> ModuleT:
        """The model with shape-only variables (nothing allocated): key maps, shape checks, restore targets."""
        return abstract_model(new, as_config(config))

    def build(config: ConfigT | Mapping[str, Any] | None = None, *, seed: int = 0) -> ModuleT:
        """A randomly initialised model (default config when `config` is None)."""
        cfg = as_config(config)
        if init is not None:
            return init(cfg, seed)
        if random_variables is not None:
            model = abstract(cfg)
            assign_variables(model, random_variables(cfg, seed), what=f"random {kind}")
            return model
        return new(cfg, nnx.Rngs(seed))

    def load(path: str | os.PathLike, **overrides: Any) -> ModuleT:
        """The model from a weights directory (`python -m eqvae_jax.convert` or `save`); `overrides` replace
        stored config fields that do not change the weights (e.g. a compute dtype)."""
        fields = {f.name for f in dataclasses.fields(config_cls)}
        allowed = fields if load_overrides is None else set(load_overrides)
        if set(overrides) - allowed:
            raise ValueError(f"{kind}.load: can only override {sorted(allowed)}, got {sorted(overrides)}.")
        return load_model(path, kind, lambda cfg: abstract(dataclasses.replace(as_config(cfg), **overrides)))

    def save(model: ModuleT, path: str | os.PathLike) -> None:
        """Write `model` as a weights directory (`path` must not exist; convert.atomic makes it atomic)."""
        save_weights(path, kind, to_json_dict(config_of(model)), flat_variables(model))

    return ModelAPI(build, abstract, load, save)
