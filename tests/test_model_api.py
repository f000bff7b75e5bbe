"""Every model module has the same build / abstract / load / save (`models.weights.model_api`), and
build -> save -> load gives back exactly the built variables, their NNX types and the config."""

from __future__ import annotations

import dataclasses
import inspect
from types import ModuleType
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from eqvae_jax.eval import inception
from eqvae_jax.models import dinov2, discriminator, dit, kl_vae, lpips, maskgit, shapes_classifier, vq_vae
from eqvae_jax.models.weights import flat_variables, path_key, read_config

# (module, a tiny config, a config field that load may override and a value for it)
CASES: dict[str, tuple[ModuleType, Any, str, Any]] = {
    "kl_vae": (kl_vae, kl_vae.tiny(channel_mult=(1,)), "dtype", "bfloat16"),
    "vq_vae": (vq_vae, vq_vae.tiny(), "dtype", "bfloat16"),
    "dit": (dit, dit.DiTConfig(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3),
            "compute_dtype", "bfloat16"),
    "maskgit": (maskgit, maskgit.tiny(depth=1, grid_size=2, codebook_size=8, num_classes=3), "compute_dtype",
                "bfloat16"),
    "dinov2": (dinov2, dinov2.DINOv2Config(hidden_size=32, depth=1, num_heads=2, pos_grid=2), "compute_dtype",
               "bfloat16"),
    "inception": (inception, inception.tiny(), "precision", "default"),
    "lpips": (lpips, lpips.LPIPSConfig(), "dropout_rate", 0.25),
    "discriminator": (discriminator, discriminator.DiscriminatorConfig(ndf=8, n_layers=1), "stats_groups", 2),
    "shapes_classifier": (shapes_classifier, shapes_classifier.ShapesClassifierConfig(channels=(8, 8)),
                          "image_size", 16),
}
API = ("build", "abstract", "load", "save")


def _types(model: nnx.Module) -> dict[str, type]:
    return {path_key(p): type(v) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("name", API)
def test_same_signatures(name):
    """One signature per function across all model modules."""
    want = inspect.signature(getattr(kl_vae, name))
    for module, *_ in CASES.values():
        assert inspect.signature(getattr(module, name)) == want, f"{module.__name__}.{name}"
    params = list(want.parameters.values())
    if name == "build":
        assert [(p.name, p.kind, p.default) for p in params] == [
            ("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, None), ("seed", inspect.Parameter.KEYWORD_ONLY, 0)]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_build_save_load_round_trip(kind, tmp_path):
    module, config, field, value = CASES[kind]
    model = module.build(config, seed=3)
    assert module.abstract(config).__class__ is model.__class__
    module.save(model, tmp_path / "w")
    assert read_config(tmp_path / "w")[0] == module.KIND

    again = module.load(tmp_path / "w")
    assert again.config == model.config
    want, got = flat_variables(model), flat_variables(again)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    assert _types(again) == _types(model)  # e.g. frozen networks keep their non-Param variables

    other = module.load(tmp_path / "w", **{field: value})
    assert other.config == dataclasses.replace(model.config, **{field: value})
    with pytest.raises(ValueError, match="override"):
        module.load(tmp_path / "w", no_such_field=1)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_build_takes_config_dict_and_seed(kind):
    """The dict form of a config (as in config.json) builds the same model; the seed changes the weights."""
    module, config, *_ = CASES[kind]
    a = flat_variables(module.build(config, seed=1))
    b = flat_variables(module.build(dataclasses.asdict(config), seed=1))
    c = flat_variables(module.build(config, seed=2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_abstract_models_are_independent_and_follow_their_config(kind):
    """`abstract` traces a constructor once per config (models.weights.abstract_model): each call still returns a
    module of its own, so assigning into one (as load and the host init do) leaves the next one shape-only, and
    a changed config gives its own shapes and fields."""
    module, config, field, value = CASES[kind]
    first, second = module.abstract(config), module.abstract(config)
    state = nnx.to_flat_state(nnx.state(first))
    assert state and all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in state)
    built = module.build(config, seed=0)  # host-initialised models assign into an abstract one
    for (_, var), (_, again) in zip(state, nnx.to_flat_state(nnx.state(second)), strict=True):
        assert var is not again
        var.set_value(np.zeros(var.shape, var.dtype))
        assert isinstance(again.get_value(), jax.ShapeDtypeStruct)
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
               for _, v in nnx.to_flat_state(nnx.state(module.abstract(config))))
    assert module.abstract(config).config == built.config == config
    changed = module.abstract(dataclasses.replace(config, **{field: value}))
    assert changed.config == dataclasses.replace(config, **{field: value})
