"""Explicit key maps between the Flax `KLVAE` and the two PyTorch layouts (LDM/CompVis and diffusers).

One row per PyTorch module: (LDM prefix, diffusers prefix, kind). The Flax path is the LDM prefix with '/' for
'.' (the NNX attribute names are LDM's). Kinds and their parameters:

    conv  kernel <-> weight (HWIO <-> OIHW), bias <-> bias
    norm  scale  <-> weight,                 bias <-> bias
    attn  kernel <-> weight ((in, out) <-> (out, in); LDM stores a 1x1 conv (out, in, 1, 1)), bias <-> bias

Decoder levels: LDM `decoder.up.{i}` is diffusers `decoder.up_blocks.{n-1-i}` (diffusers counts from the
lowest resolution). Resnet shortcut: LDM `nin_shortcut`, diffusers `conv_shortcut`. Mid attention: LDM
`mid.attn_1.{norm,q,k,v,proj_out}`, diffusers `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`
(older diffusers files say query/key/value/proj_attn; `rename_legacy_diffusers` maps them).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from eqvae_jax.convert.torch_files import conv_to_flax, conv_to_torch, linear_to_flax, linear_to_torch
from eqvae_jax.models import kl_vae, weights

LAYOUTS = ("ldm", "diffusers")
_PARAMS = {"conv": (("kernel", "weight"), ("bias", "bias")),
           "norm": (("scale", "weight"), ("bias", "bias")),
           "attn": (("kernel", "weight"), ("bias", "bias"))}


def module_rows(cfg: kl_vae.KLVAEConfig) -> list[tuple[str, str, str]]:
    """(LDM prefix, diffusers prefix, kind) for every parameterised module of a KLVAE with config `cfg`."""
    rows: list[tuple[str, str, str]] = []
    ch, mult, n = cfg.base_channels, cfg.channel_mult, len(cfg.channel_mult)

    def resnet(ldm: str, diff: str, in_ch: int, out_ch: int) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            rows.append((f"{ldm}.{name}", f"{diff}.{name}", name[:4]))
        if in_ch != out_ch:
            rows.append((f"{ldm}.nin_shortcut", f"{diff}.conv_shortcut", "conv"))

    def mid(side: str) -> None:
        c = ch * mult[-1]
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", c, c)
        if cfg.mid_attention:
            ldm, diff = f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0"
            rows.append((f"{ldm}.norm", f"{diff}.group_norm", "norm"))
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
                rows.append((f"{ldm}.{a}", f"{diff}.{b}", "attn"))
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", c, c)

    rows.append(("encoder.conv_in", "encoder.conv_in", "conv"))
    in_ch = ch
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", in_ch, ch * mult[i])
            in_ch = ch * mult[i]
        if i != n - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                         "conv"))
    mid("encoder")
    rows.append(("encoder.norm_out", "encoder.conv_norm_out", "norm"))
    rows.append(("encoder.conv_out", "encoder.conv_out", "conv"))
    if cfg.use_quant_conv:
        rows.append(("quant_conv", "quant_conv", "conv"))
    if cfg.use_post_quant_conv:
        rows.append(("post_quant_conv", "post_quant_conv", "conv"))
    rows.append(("decoder.conv_in", "decoder.conv_in", "conv"))
    mid("decoder")
    in_ch = ch * mult[-1]
    for i in reversed(range(n)):
        d = n - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", in_ch, ch * mult[i])
            in_ch = ch * mult[i]
        if i != 0:
            rows.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{d}.upsamplers.0.conv", "conv"))
    rows.append(("decoder.norm_out", "decoder.conv_norm_out", "norm"))
    rows.append(("decoder.conv_out", "decoder.conv_out", "conv"))
    return rows


def key_map(cfg: kl_vae.KLVAEConfig, layout: str) -> list[tuple[str, str, str]]:
    """(Flax key, PyTorch key in `layout`, kind) for every parameter."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown PyTorch layout {layout!r}; expected one of {LAYOUTS}.")
    out = []
    for ldm, diff, kind in module_rows(cfg):
        prefix = ldm if layout == "ldm" else diff
        for flax_name, torch_name in _PARAMS[kind]:
            out.append((f"{ldm.replace('.', '/')}/{flax_name}", f"{prefix}.{torch_name}", kind))
    return out


def model_shapes(cfg: kl_vae.KLVAEConfig) -> dict[str, tuple[int, ...]]:
    """{Flax key: shape} of a KLVAE with config `cfg` (shape-only, nothing is allocated)."""
    return dict(_model_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _model_shapes(cfg: kl_vae.KLVAEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    state = nnx.state(kl_vae.abstract(cfg))
    return tuple((weights.path_key(p), tuple(v.get_value().shape)) for p, v in nnx.to_flat_state(state))


def _torch_shape(flax_shape: tuple[int, ...], kind: str, flax_name: str) -> tuple[int, ...]:
    if flax_name != "kernel":
        return flax_shape
    if kind == "conv":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(reversed(flax_shape))


def _squeeze_1x1(value: np.ndarray) -> np.ndarray:
    """A 1x1-conv attention weight (out, in, 1, 1) as a linear weight (out, in); anything else unchanged."""
    return value[:, :, 0, 0] if value.ndim == 4 and value.shape[2:] == (1, 1) else value


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
    rows = key_map(cfg, layout)
    shapes = model_shapes(cfg)
    expected = {t: _torch_shape(shapes[f], kind, f.rsplit("/", 1)[1]) for f, t, kind in rows}
    attn_keys = {t for _, t, kind in rows if kind == "attn"}
    got = {k: (_squeeze_1x1(v) if k in attn_keys else v).shape for k, v in state_dict.items()}
    weights.check_shapes(what, got, expected)
    flat = {}
    for f, t, kind in rows:
        value = np.asarray(state_dict[t], dtype=np.float32)
        if f.endswith("/kernel"):
            value = conv_to_flax(value) if kind == "conv" else linear_to_flax(_squeeze_1x1(value))
        flat[f] = np.ascontiguousarray(value)
    weights.check_shapes(f"{what} (converted)", {k: v.shape for k, v in flat.items()}, shapes)
    return flat


def flax_to_torch(flat: Mapping[str, np.ndarray], cfg: kl_vae.KLVAEConfig, layout: str,
                  what: str = "Flax weights") -> dict[str, np.ndarray]:
    """Flat Flax variables -> a float32 PyTorch state dict in `layout` (LDM attention as 1x1 convs)."""
    rows = key_map(cfg, layout)
    weights.check_shapes(what, {k: np.shape(v) for k, v in flat.items()}, model_shapes(cfg))
    out = {}
    for f, t, kind in rows:
        value = np.asarray(flat[f], dtype=np.float32)
        if f.endswith("/kernel"):
            if kind == "conv":
                value = conv_to_torch(value)
            else:
                value = linear_to_torch(value)
                if layout == "ldm":
                    value = value[:, :, None, None]
        out[t] = np.ascontiguousarray(value)
    return out
