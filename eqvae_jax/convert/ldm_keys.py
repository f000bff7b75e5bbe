"""Key-map rows of the LDM / taming Encoder-Decoder trunk (`models.layers.Trunk`), shared by the KL-VAE and
VQ-VAE converters, and what both need around them: attention weights stored as 1x1 convs, and the trunk's shape
read back from a state dict.

Rows are (LDM prefix, diffusers prefix, kind); the Flax path is the LDM prefix with '/' for '.'. Kinds and their
parameters:

    conv  kernel <-> weight (HWIO <-> OIHW), bias <-> bias
    norm  scale  <-> weight,                 bias <-> bias
    attn  kernel <-> weight ((in, out) <-> (out, in); LDM stores a 1x1 conv (out, in, 1, 1)), bias <-> bias

Decoder levels: LDM `decoder.up.{i}` is diffusers `decoder.up_blocks.{n-1-i}`. Resnet shortcut: LDM
`nin_shortcut`, diffusers `conv_shortcut`. Attention: LDM `{norm,q,k,v,proj_out}`, diffusers
`{group_norm,to_q,to_k,to_v,to_out.0}`; mid `mid.attn_1` / `mid_block.attentions.0`, levels `down.{i}.attn.{j}` /
`down_blocks.{i}.attentions.{j}` (and `up`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from eqvae_jax.convert.key_map import KeyMap, Row
from eqvae_jax.models.layers import Trunk
from eqvae_jax.models.weights import KeyMismatchError

PARAMS = {"conv": (("kernel", "weight"), ("bias", "bias")),
          "norm": (("scale", "weight"), ("bias", "bias")),
          "attn": (("kernel", "weight"), ("bias", "bias"))}
_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))


def trunk_rows(trunk: Trunk) -> list[tuple[str, str, str]]:
    """(LDM prefix, diffusers prefix, kind) of every parameterised module of an Encoder/Decoder pair (shapes
    come from the model itself, see `key_map.KeyMap`)."""
    rows: list[tuple[str, str, str]] = []
    ch, mult, n = trunk.base_channels, trunk.channel_mult, len(trunk.channel_mult)

    def resnet(ldm: str, diff: str, in_ch: int, out_ch: int) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            rows.append((f"{ldm}.{name}", f"{diff}.{name}", name[:4]))
        if in_ch != out_ch:
            rows.append((f"{ldm}.nin_shortcut", f"{diff}.conv_shortcut", "conv"))

    def attention(ldm: str, diff: str) -> None:
        rows.append((f"{ldm}.norm", f"{diff}.group_norm", "norm"))
        for a, b in _ATTN:
            rows.append((f"{ldm}.{a}", f"{diff}.{b}", "attn"))

    def mid(side: str) -> None:
        c = ch * mult[-1]
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", c, c)
        if trunk.mid_attention:
            attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", c, c)

    enc_attn, dec_attn = trunk.encoder_attention(), trunk.decoder_attention()
    rows.append(("encoder.conv_in", "encoder.conv_in", "conv"))
    in_ch = ch
    for i in range(n):
        for j in range(trunk.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", in_ch, ch * mult[i])
            in_ch = ch * mult[i]
            if enc_attn[i]:
                attention(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}")
        if i != n - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                         "conv"))
    mid("encoder")
    rows.append(("encoder.norm_out", "encoder.conv_norm_out", "norm"))
    rows.append(("encoder.conv_out", "encoder.conv_out", "conv"))
    rows.append(("decoder.conv_in", "decoder.conv_in", "conv"))
    mid("decoder")
    in_ch = ch * mult[-1]
    for i in reversed(range(n)):
        d = n - 1 - i
        for j in range(trunk.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", in_ch, ch * mult[i])
            in_ch = ch * mult[i]
            if dec_attn[i]:
                attention(f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{d}.attentions.{j}")
        if i != 0:
            rows.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{d}.upsamplers.0.conv", "conv"))
    rows.append(("decoder.norm_out", "decoder.conv_norm_out", "norm"))
    rows.append(("decoder.conv_out", "decoder.conv_out", "conv"))
    return rows


def key_map(module_rows: list[tuple[str, str, str]], layout: str) -> KeyMap:
    """The KeyMap (Flax key, PyTorch key in `layout` = 'ldm' or 'diffusers', tensor layout) of `module_rows`."""
    rows = []
    for ldm, diff, kind in module_rows:
        prefix = ldm if layout == "ldm" else diff
        for flax_name, torch_name in PARAMS[kind]:
            tensor_layout = {"conv": "conv", "attn": "linear"}.get(kind) if flax_name == "kernel" else None
            rows.append(Row(f"{ldm.replace('.', '/')}/{flax_name}", f"{prefix}.{torch_name}", tensor_layout))
    return KeyMap(rows)


def attention_keys(km: KeyMap) -> set[str]:
    """PyTorch names of the attention q/k/v/proj_out weights (the 'linear' rows)."""
    return {r.torch for r in km.rows if r.layout == "linear"}


def squeeze_attention(state_dict: Mapping[str, np.ndarray], km: KeyMap) -> dict[str, np.ndarray]:
    """Attention weights stored as 1x1 convs (out, in, 1, 1) -> (out, in); everything else unchanged."""
    attn = attention_keys(km)
    return {k: (v[:, :, 0, 0] if k in attn and np.ndim(v) == 4 and np.shape(v)[2:] == (1, 1) else v)
            for k, v in state_dict.items()}


def unsqueeze_attention(state_dict: dict[str, np.ndarray], km: KeyMap) -> dict[str, np.ndarray]:
    """Attention weights (out, in) -> LDM's 1x1 convs (out, in, 1, 1), in place; returns `state_dict`."""
    for k in attention_keys(km):
        state_dict[k] = state_dict[k][:, :, None, None]
    return state_dict


def infer_trunk(sd: Mapping[str, np.ndarray], what: str) -> dict[str, Any]:
    """What the shapes of an LDM-layout state dict say about its trunk: base_channels, channel_mult,
    num_res_blocks, in_channels, out_channels, encoder_out (conv_out width), decoder_in (decoder.conv_in
    width), mid_attention and attention_levels (encoder levels with `down.{i}.attn.0`)."""
    needed = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv2.weight", "encoder.conv_out.weight",
              "decoder.conv_in.weight", "decoder.conv_out.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KeyMismatchError(f"{what} (inferring the architecture)", missing=missing)
    base, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    mult = []
    while f"encoder.down.{len(mult)}.block.0.conv2.weight" in sd:
        out = sd[f"encoder.down.{len(mult)}.block.0.conv2.weight"].shape[0]
        if out % base:
            raise ValueError(f"{what}: level {len(mult)} has {out} channels, not a multiple of {base}.")
        mult.append(out // base)
    n_blocks = 0
    while f"encoder.down.0.block.{n_blocks}.conv1.weight" in sd:
        n_blocks += 1
    return dict(
        base_channels=int(base),
        channel_mult=tuple(mult),
        num_res_blocks=n_blocks,
        in_channels=int(in_ch),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        encoder_out=int(sd["encoder.conv_out.weight"].shape[0]),
        decoder_in=int(sd["decoder.conv_in.weight"].shape[1]),
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
        attention_levels=tuple(i for i in range(len(mult)) if f"encoder.down.{i}.attn.0.q.weight" in sd),
    )
