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

from eqvae_jax.convert.key_map import KeyMap, Row
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


def key_map(cfg: kl_vae.KLVAEConfig, layout: str) -> KeyMap:
    """The rows (Flax key, PyTorch key in `layout`, tensor layout) of every parameter."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown PyTorch layout {layout!r}; expected one of {LAYOUTS}.")
    rows = []
    for ldm, diff, kind in module_rows(cfg):
        prefix = ldm if layout == "ldm" else diff
        for flax_name, torch_name in _PARAMS[kind]:
            tensor_layout = {"conv": "conv", "attn": "linear"}.get(kind) if flax_name == "kernel" else None
            rows.append(Row(f"{ldm.replace('.', '/')}/{flax_name}", f"{prefix}.{torch_name}", tensor_layout))
    return KeyMap(rows)


def model_shapes(cfg: kl_vae.KLVAEConfig) -> dict[str, tuple[int, ...]]:
    """{Flax key: shape} of a KLVAE with config `cfg` (shape-only, nothing is allocated)."""
    return dict(_model_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _model_shapes(cfg: kl_vae.KLVAEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(weights.variable_shapes(kl_vae.abstract(cfg)).items())


def _attention_keys(km: KeyMap) -> set[str]:
    return {r.torch for r in km.rows if r.layout == "linear"}


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
    attn = _attention_keys(km)
    squeezed = {k: (v[:, :, 0, 0] if k in attn and np.ndim(v) == 4 and np.shape(v)[2:] == (1, 1) else v)
                for k, v in state_dict.items()}
    return km.to_flax(squeezed, model_shapes(cfg), what)


def flax_to_torch(flat: Mapping[str, np.ndarray], cfg: kl_vae.KLVAEConfig, layout: str,
                  what: str = "Flax weights") -> dict[str, np.ndarray]:
    """Flat Flax variables -> a float32 PyTorch state dict in `layout` (LDM attention as 1x1 convs)."""
    km = key_map(cfg, layout)
    out = km.to_torch(flat, model_shapes(cfg), what)
    if layout == "ldm":
        for k in _attention_keys(km):
            out[k] = out[k][:, :, None, None]
    return out
