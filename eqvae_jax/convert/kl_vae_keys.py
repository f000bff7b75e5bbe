"""Explicit key maps between the Flax `KLVAE` and the two PyTorch layouts (LDM/CompVis and diffusers).

The trunk's rows (and the naming rules of both layouts) are `convert.ldm_keys`; the KL-VAE adds its quant convs.
Older diffusers files name the mid attention query/key/value/proj_attn; `rename_legacy_diffusers` maps them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np

from eqvae_jax.convert import ldm_keys
from eqvae_jax.convert.key_map import KeyMap
from eqvae_jax.models import kl_vae, weights

LAYOUTS = ("ldm", "diffusers")


def module_rows(cfg: kl_vae.KLVAEConfig) -> list[tuple[str, str, str]]:
    """(LDM prefix, diffusers prefix, kind) for every parameterised module of a KLVAE with config `cfg`."""
    rows = ldm_keys.trunk_rows(cfg.trunk())
    if cfg.use_quant_conv:
        rows.append(("quant_conv", "quant_conv", "conv"))
    if cfg.use_post_quant_conv:
        rows.append(("post_quant_conv", "post_quant_conv", "conv"))
    return rows


def key_map(cfg: kl_vae.KLVAEConfig, layout: str) -> KeyMap:
    """The rows (Flax key, PyTorch key in `layout`, tensor layout) of every parameter."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown PyTorch layout {layout!r}; expected one of {LAYOUTS}.")
    return ldm_keys.key_map(module_rows(cfg), layout)


def model_shapes(cfg: kl_vae.KLVAEConfig) -> dict[str, tuple[int, ...]]:
    """{Flax key: shape} of a KLVAE with config `cfg` (shape-only, nothing is allocated)."""
    return dict(_model_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _model_shapes(cfg: kl_vae.KLVAEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(weights.variable_shapes(kl_vae.abstract(cfg)).items())


def rename_legacy_diffusers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers attention names (query/key/value/proj_attn) -> current ones (to_q/to_k/to_v/to_out.0)."""
    names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    pattern = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
    out = {}
    for k, v in state_dict.items():
        m = pattern.match(k)
        out[f"{m[1]}{names[m[2]]}.{m[3]}" if m else k] = v
    return out


def torch_to_flax(state_dict: Mapping[str, np.ndarray], cfg: kl_vae.KLVAEConfig, layout: str,
                  what: str = "state dict") -> dict[str, np.ndarray]:
    """A PyTorch state dict in `layout` -> flat float32 Flax variables; strict (KeyMismatchError names keys).

    Attention q/k/v/out weights are accepted both as Linear (out, in) and as 1x1 conv (out, in, 1, 1).
    """
    km = key_map(cfg, layout)
    return km.to_flax(ldm_keys.squeeze_attention(state_dict, km), model_shapes(cfg), what)


def flax_to_torch(flat: Mapping[str, np.ndarray], cfg: kl_vae.KLVAEConfig, layout: str,
                  what: str = "Flax weights") -> dict[str, np.ndarray]:
    """Flat Flax variables -> a float32 PyTorch state dict in `layout` (LDM attention as 1x1 convs)."""
    km = key_map(cfg, layout)
    out = km.to_torch(flat, model_shapes(cfg), what)
    return ldm_keys.unsqueeze_attention(out, km) if layout == "ldm" else out
