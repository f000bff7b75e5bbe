"""Every recipe value is stated in one place (docs/jobs.md, "Configs").

The schema defaults are the reference recipe; a config file states only what differs from them, plus its
variants. Each config file is run with each of its variants while every assignment to the config is recorded
(file, line, dotted key, value before and after): an assignment that leaves the value as it was in every variant
restates a default (or the base recipe) and fails. Every variant also parses through its job's schema.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any

import pytest
from helpers import REPO
from ml_collections import ConfigDict, config_dict

from eqvae_jax import typed_config
from eqvae_jax.replicate.config import ReplicateConfig
from eqvae_jax.train.dit.config import DiTJobConfig
from eqvae_jax.train.eqvae.config import SCHEMAS as EQ_SCHEMAS
from eqvae_jax.train.eval_vae.config import EvalVAEConfig
from eqvae_jax.train.latents.config import ExtractConfig
from eqvae_jax.train.maskgit.config import MaskGITJobConfig

# Every config file with the variants that exercise each of its assignments (a new variant key must be added).
VARIANTS = {
    "demo": [""],
    "dit": ["", "model=XL/2", "model=L/4", "objective=sit", "tiny", "objective=sit,repa", "objective=sit,repa,tiny"],
    "eval_vae": ["", "models=vqgan+eq_vqgan+other", "tiny"],
    "extract_latents": ["", "images", "tiny"],
    "extract_tokens": ["", "crops=8", "tiny", "tiny,crops=3"],
    "maskgit": ["", "batch=256", "model=big", "chang", "tiny"],
    "replicate": ["", "smoke", "tpu", "kl", "vq", "smoke,vq"],
    "sdvae_ft": ["", "vae=sdxl", "vae=sd3", "ema", "tiny", "vae=sd3,tiny"],
    "vqgan_ft": ["", "tiny", "demo"],
}


def schema(name: str, config: ConfigDict) -> type:
    if name == "eval_vae":
        return EvalVAEConfig
    if name == "replicate":
        return ReplicateConfig
    trainers = {**EQ_SCHEMAS, "extract_latents": ExtractConfig, "extract_tokens": ExtractConfig,
                "dit": DiTJobConfig, "maskgit": MaskGITJobConfig}
    return trainers[config.trainer]


def plain(value: Any) -> Any:
    """A comparable value: sections and mappings as dicts, tuples as lists, references resolved."""
    if isinstance(value, Recorder):
        value = value._section
    if isinstance(value, config_dict.FieldReference):
        value = value.get()
    if isinstance(value, ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@dataclasses.dataclass
class Assignment:
    where: str  # configs/X.py:LINE
    key: str
    changed: bool


class Recorder:
    """A ConfigDict section that records every assignment and whether it changed the value."""

    def __init__(self, section: ConfigDict, path: str, log: list[Assignment]):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._section, name)
        return Recorder(value, f"{self._path}{name}.", self._log) if isinstance(value, ConfigDict) else value

    __getitem__ = __getattr__

    def __contains__(self, name: str) -> bool:
        return name in self._section

    def __setattr__(self, name: str, value: Any) -> None:
        caller = sys._getframe(1)
        if caller.f_code.co_name == "__setitem__":
            caller = caller.f_back
        before = plain(self._section[name]) if name in self._section else object()
        value = value._section if isinstance(value, Recorder) else value
        setattr(self._section, name, value)
        where = f"{os.path.relpath(caller.f_code.co_filename, REPO)}:{caller.f_lineno}"
        self._log.append(Assignment(where, self._path + name, before != plain(self._section[name])))

    def __setitem__(self, name: str, value: Any) -> None:
        self.__setattr__(name, value)


def run_config(name: str, arg: str, log: list[Assignment], keys: set[str]) -> ConfigDict:
    """configs/NAME.py's get_config(arg), its schema defaults recorded, the variant keys it declares in `keys`."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults, parse_arg = module.defaults, getattr(module, "parse_arg", None)
    module.defaults = lambda *a, **k: Recorder(defaults(*a, **k), "", log)
    if parse_arg is not None:
        def declared(arg: str, choices: Any = None, **known: Any):
            keys.update(known)
            return parse_arg(arg, choices, **known)
        module.parse_arg = declared
    config = module.get_config(arg) if arg else module.get_config()
    return config._section if isinstance(config, Recorder) else config


def test_every_config_file_is_covered():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
    assert files - {"__init__"} == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_value_is_stated_once(name):
    """No assignment restates the value already there (a schema default, or the base recipe in a variant)."""
    changed: dict[tuple[str, str], bool] = {}
    keys: set[str] = set()
    for arg in VARIANTS[name]:
        log: list[Assignment] = []
        config = run_config(name, arg, log, keys)
        _, problems = typed_config.parse_collect(schema(name, config), config)
        assert not problems, f"configs/{name}.py:{arg}: {problems}"
        for a in log:
            if a.where.startswith("configs/"):
                changed[a.where, a.key] = changed.get((a.where, a.key), False) or a.changed
    restated = sorted(f"{where} {key}" for (where, key), moved in changed.items() if not moved)
    assert not restated, ("these assignments leave the value as it already is in every variant tested (state a "
                          "reference value once, as the schema default): " + "; ".join(restated))
    used = {item.partition("=")[0] for arg in VARIANTS[name] for item in filter(None, arg.split(","))}
    assert keys <= used, f"configs/{name}.py has variants the test does not run: {sorted(keys - used)}"
