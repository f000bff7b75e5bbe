"""DINOv2 weights: torch-hub checkpoints and transformers directories <-> eqvae-jax (`--kind dinov2`).

    python -m eqvae_jax.convert --kind dinov2 --src dinov2_vitb14_pretrain.pth --dst weights/dinov2_vitb14
    python -m eqvae_jax.convert --kind dinov2 --src hf/dinov2-base --dst weights/dinov2_vitb14   # same weights
    python -m eqvae_jax.convert --kind dinov2 --src weights/dinov2_vitb14 --dst back.pth --to hub
    python -m eqvae_jax.convert --kind dinov2 --src weights/dinov2_vitb14 --dst hf_dir --to hf

Sources:
  * a torch-hub state dict (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, what REPA loads): `cls_token`,
    `pos_embed`, [`register_tokens`], `mask_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1, attn.qkv,
    attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3, ls2.gamma}.*`, `norm.*` (.pth/.pt or
    .safetensors). Size, depth, FFN type, registers and position grid are read off the shapes; the head count
    from the reference sizes (384/768/1024/1536 -> 6/12/16/24) or `--extra num_heads=N`.
  * a transformers directory (`config.json` + `model.safetensors` or `pytorch_model.bin`) of `Dinov2Model`
    or `Dinov2WithRegistersModel`, in the key layout its `save_pretrained` writes and the Hub serves
    (`attention.attention.{query,key,value}`, `attention.output.dense`, `layer_scale{1,2}.lambda1`,
    `mlp.weights_in/weights_out` for SwiGLU). q, k, v are concatenated into the hub's fused qkv (SwiGLU's
    `weights_in` already is the hub's `w12`), so both layouts of the same weights give bit-identical files.

Options (`--extra KEY=VALUE`): num_heads, pos_interpolation ("antialias", the default: timm's
`resample_abs_pos_embed` as REPA uses it; "bicubic": transformers' `Dinov2Model`), compute_dtype.
Targets: flax (default), hub (a .pth/.pt/.safetensors state dict), hf (a transformers directory).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, Row
from eqvae_jax.convert.options import check_destination, check_target, typed_options
from eqvae_jax.convert.torch_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_state_dict,
    write_safetensors,
    write_state_dict,
)
from eqvae_jax.models import dinov2
from eqvae_jax.models.dinov2 import SIZES, DINOv2Config
from eqvae_jax.models.weights import KeyMismatchError, check_shapes, load_weights, save_weights, variable_shapes

KIND = dinov2.KIND
TARGETS = ("flax", "hub", "hf")
OPTIONS = {"num_heads": int, "pos_interpolation": str, "compute_dtype": str}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}


# ---------------------------------------------------------------------------------------------------------
# torch-hub layout (the Flax names follow it)
# ---------------------------------------------------------------------------------------------------------


def key_map(cfg: DINOv2Config) -> KeyMap:
    """Rows (Flax key, hub key, layout) for `cfg`; '{i}' rows are the stacked blocks."""
    rows = [
        Row("patch_embed/proj/kernel", "patch_embed.proj.weight", "conv"),
        Row("patch_embed/proj/bias", "patch_embed.proj.bias"),
        Row("cls_token", "cls_token"),
        Row("pos_embed", "pos_embed"),
        Row("norm/scale", "norm.weight"),
        Row("norm/bias", "norm.bias"),
    ]
    if cfg.num_register_tokens:
        rows.append(Row("register_tokens", "register_tokens"))
    if cfg.use_mask_token:
        rows.append(Row("mask_token", "mask_token"))
    for norm in ("norm1", "norm2"):
        rows += [Row(f"blocks/{norm}/scale", f"blocks.{{i}}.{norm}.weight"), Row(f"blocks/{norm}/bias",
                                                                                  f"blocks.{{i}}.{norm}.bias")]
    rows += [Row(f"blocks/{ls}/gamma", f"blocks.{{i}}.{ls}.gamma") for ls in ("ls1", "ls2")]
    linears = ["attn.qkv", "attn.proj"] + (["mlp.fc1", "mlp.fc2"] if cfg.ffn == "mlp" else ["mlp.w12", "mlp.w3"])
    for name in linears:
        flax = "blocks/" + name.replace(".", "/")
        rows += [Row(f"{flax}/kernel", f"blocks.{{i}}.{name}.weight", "linear"),
                 Row(f"{flax}/bias", f"blocks.{{i}}.{name}.bias")]
    return KeyMap(rows, cfg.depth)


def hub_shapes(cfg: DINOv2Config) -> dict[str, tuple[int, ...]]:
    """Every key of the torch-hub model's state dict (head removed) for `cfg`, with its shape."""
    return key_map(cfg).torch_shapes(variable_shapes(dinov2.abstract(cfg)))


def hub_to_flax(sd: Mapping[str, np.ndarray], cfg: DINOv2Config, what: str = "state dict") -> dict[str, np.ndarray]:
    """Hub state dict -> flat Flax variables; strict (names every missing / unexpected / mis-shaped key)."""
    return key_map(cfg).to_flax(sd, variable_shapes(dinov2.abstract(cfg)), what)


def flax_to_hub(flat: Mapping[str, np.ndarray], cfg: DINOv2Config) -> dict[str, np.ndarray]:
    return key_map(cfg).to_torch(flat, variable_shapes(dinov2.abstract(cfg)), "eqvae-jax weights")


def _heads(hidden: int, options: Mapping[str, Any], what: str) -> int:
    if "num_heads" in options:
        return options["num_heads"]
    by_hidden = {h: n for h, _, n, _ in SIZES.values()}
    if hidden not in by_hidden:
        raise ValueError(f"{what}: hidden size {hidden} is not a DINOv2 reference size; pass --extra num_heads=N")
    return by_hidden[hidden]


def _grid(tokens: int, what: str) -> int:
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ValueError(f"{what}: the position embedding has {tokens} rows, not 1 + a square grid")
    return side


def _overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("pos_interpolation", "compute_dtype") if k in options}


def infer_hub_config(sd: Mapping[str, np.ndarray], what: str, **options: Any) -> DINOv2Config:
    """Hidden size, depth, patch, FFN type and width, registers and position grid read off a hub state dict."""
    needed = ["patch_embed.proj.weight", "pos_embed"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KeyMismatchError(f"{what}: cannot infer the DINOv2 size", missing=missing)
    hidden, cin, patch, _ = sd["patch_embed.proj.weight"].shape
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    swiglu = "blocks.0.mlp.w12.weight" in sd
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return DINOv2Config(
        hidden_size=hidden, depth=max(blocks) + 1 if blocks else 0, num_heads=_heads(hidden, options, what),
        mlp_ratio=mlp_ratio, ffn="swiglu" if swiglu else "mlp", patch_size=patch,
        pos_grid=_grid(sd["pos_embed"].shape[1], what), num_register_tokens=registers,
        use_mask_token="mask_token" in sd, in_channels=cin, **_overrides(options),
    )


# ---------------------------------------------------------------------------------------------------------
# transformers layout
# ---------------------------------------------------------------------------------------------------------

_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK = {  # per-layer renames that keep the tensor as it is
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",  # SwiGLU: [gate; up] rows == the hub's [x1; x2]
    "mlp.weights_out": "mlp.w3",
}
_QKV = ("query", "key", "value")


def _hf_name(hub_key: str) -> str | None:
    """The transformers key of a hub key, or None for the fused qkv (three transformers keys)."""
    for hf, hub in _HF_GLOBAL.items():
        if hub_key == hub:
            return hf
    m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", hub_key)
    if m is None:
        raise ValueError(f"no transformers name for {hub_key}")
    i, name, leaf = m.groups()
    if name == "attn.qkv":
        return None
    full = f"{name}.{leaf}"
    for hf, hub in _HF_BLOCK.items():
        if full == hub or full.startswith(hub + "."):
            return f"encoder.layer.{i}.{hf}{full[len(hub):]}"
    raise ValueError(f"no transformers name for {hub_key}")


def hf_shapes(cfg: DINOv2Config) -> dict[str, tuple[int, ...]]:
    """Every key of transformers' saved state dict for `cfg`, with its shape."""
    out = {}
    for key, shape in hub_shapes(cfg).items():
        name = _hf_name(key)
        if name is not None:
            out[name] = shape
            continue
        i, leaf = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key).groups()
        for part in _QKV:
            out[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = (shape[0] // 3, *shape[1:])
    return out


def hf_to_hub(sd: Mapping[str, np.ndarray], cfg: DINOv2Config, what: str = "state dict") -> dict[str, np.ndarray]:
    """transformers state dict -> hub state dict (q, k, v concatenated); strict on the transformers keys."""
    check_shapes(what, {k: np.shape(v) for k, v in sd.items()}, hf_shapes(cfg))
    out = {}
    for key in hub_shapes(cfg):
        name = _hf_name(key)
        if name is not None:
            out[key] = sd[name]
            continue
        i, leaf = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key).groups()
        out[key] = np.concatenate([sd[f"encoder.layer.{i}.attention.attention.{p}.{leaf}"] for p in _QKV], axis=0)
    return out


def hub_to_hf(sd: Mapping[str, np.ndarray], cfg: DINOv2Config) -> dict[str, np.ndarray]:
    """hub state dict -> transformers state dict (the fused qkv split into query, key, value)."""
    out = {}
    for key, value in sd.items():
        name = _hf_name(key)
        if name is not None:
            out[name] = value
            continue
        i, leaf = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key).groups()
        for part, chunk in zip(_QKV, np.split(value, 3, axis=0), strict=True):
            out[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = np.ascontiguousarray(chunk)
    return out


def hf_config(path: str, sd: Mapping[str, np.ndarray], **options: Any) -> DINOv2Config:
    """Our config from a transformers `config.json` (the position grid from the stored embedding)."""
    with open(os.path.join(path, "config.json")) as f:
        hc = json.load(f)
    model_type = hc.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {sorted(HF_MODEL_TYPES)}")
    expect = {"hidden_act": "gelu", "qkv_bias": True}
    for key, value in expect.items():
        if hc.get(key, value) != value:
            raise ValueError(f"{path}: {key}={hc[key]!r} is not what DINOv2 uses ({value!r})")
    patch = hc.get("patch_size", 14)
    pos = sd.get("embeddings.position_embeddings")
    if pos is None:
        raise KeyMismatchError(f"{path}: cannot read the position grid", missing=["embeddings.position_embeddings"])
    with_registers = model_type == "dinov2_with_registers"
    return DINOv2Config(
        hidden_size=hc.get("hidden_size", 768), depth=hc.get("num_hidden_layers", 12),
        num_heads=options.get("num_heads", hc.get("num_attention_heads", 12)), mlp_ratio=hc.get("mlp_ratio", 4),
        ffn="swiglu" if hc.get("use_swiglu_ffn", False) else "mlp", patch_size=patch,
        pos_grid=_grid(pos.shape[1], path),
        num_register_tokens=hc.get("num_register_tokens", 4) if with_registers else 0,
        use_mask_token=True if with_registers else hc.get("use_mask_token", True),
        in_channels=hc.get("num_channels", 3), layer_norm_eps=hc.get("layer_norm_eps", 1e-6),
        **_overrides(options),
    )


def hf_config_json(cfg: DINOv2Config) -> dict[str, Any]:
    """A transformers config.json for `cfg` (Dinov2WithRegistersModel when it has registers)."""
    model_type = "dinov2_with_registers" if cfg.num_register_tokens else "dinov2"
    if cfg.num_register_tokens and not cfg.use_mask_token:
        raise ValueError("transformers' Dinov2WithRegistersModel always has a mask token; this model has none")
    out = {
        "model_type": model_type, "architectures": [HF_MODEL_TYPES[model_type]],
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        # transformers' strict config dataclass wants an int ratio (all DINOv2 sizes use 4)
        "mlp_ratio": int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio,
        "use_swiglu_ffn": cfg.ffn == "swiglu", "patch_size": cfg.patch_size,
        "image_size": cfg.image_size, "num_channels": cfg.in_channels, "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "gelu", "qkv_bias": True, "layerscale_value": 1.0,
    }
    if cfg.num_register_tokens:
        out["num_register_tokens"] = cfg.num_register_tokens
    else:
        out["use_mask_token"] = cfg.use_mask_token
    return out


def _hf_weights_file(path: str) -> str:
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: none of {', '.join(HF_WEIGHT_FILES)} in the directory")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def describe(cfg: DINOv2Config) -> str:
    name = next((f"DINOv2-{n[3:].upper()}" for n, (h, d, heads, ffn) in SIZES.items()
                 if (h, d, heads, ffn) == (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.ffn)), "DINOv2")
    regs = f", {cfg.num_register_tokens} registers" if cfg.num_register_tokens else ""
    return (f"{name} (hidden {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, {cfg.ffn} "
            f"{cfg.mlp_hidden}, patch {cfg.patch_size}, position grid {cfg.pos_grid}x{cfg.pos_grid}{regs}, "
            f"resampled {cfg.pos_interpolation})")


def read_source(src: str, **options: Any) -> tuple[dict[str, np.ndarray], DINOv2Config, str]:
    """(hub-layout state dict, config, source layout name) from a hub file or a transformers directory."""
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(f"{src}: a directory source must be a transformers model (config.json missing)")
        sd = read_state_dict(_hf_weights_file(src))
        cfg = hf_config(src, sd, **options)
        return hf_to_hub(sd, cfg, src), cfg, "transformers"
    sd = read_state_dict(src)
    return sd, infer_hub_config(sd, src, **options), "torch-hub"


def _notes(cfg: DINOv2Config, layout: str) -> str:
    if layout == "transformers" and not cfg.num_register_tokens and cfg.pos_interpolation == "antialias":
        return ("; note: off the native grid, transformers' Dinov2Model resamples position embeddings without "
                "antialias (pass --extra pos_interpolation=bicubic to match it); REPA/timm use antialias")
    return ""


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: Any) -> str:
    """Convert between the torch-hub / transformers DINOv2 layouts and an eqvae-jax weights directory."""
    check_target(KIND, to, TARGETS)
    opts = typed_options(KIND, options, OPTIONS)
    check_destination(dst, overwrite)
    if to == "flax":
        sd, cfg, layout = read_source(src, **opts)
        flat = hub_to_flax(sd, cfg, what=src)
        with atomic_path(dst, overwrite) as tmp:
            save_weights(tmp, KIND, cfg.to_dict(), flat)
        return f"{describe(cfg)}: {layout} {src} -> {dst} ({len(flat)} frozen arrays){_notes(cfg, layout)}"
    _, config, flat = load_weights(src, KIND)
    cfg = DINOv2Config.from_dict(config)
    sd = flax_to_hub(flat, cfg)
    if to == "hub":
        if not dst.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            raise ValueError(f"{dst}: --to hub writes .safetensors or .pth/.pt/.ckpt/.bin")
        with atomic_path(dst, overwrite) as tmp:
            write_state_dict(tmp, sd, like=dst)
        return f"{describe(cfg)}: {src} -> {dst} (torch-hub state dict)"
    config_json = hf_config_json(cfg)
    with atomic_path(dst, overwrite) as tmp:
        os.makedirs(tmp)
        write_safetensors(os.path.join(tmp, "model.safetensors"), hub_to_hf(sd, cfg))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
    return f"{describe(cfg)}: {src} -> {dst} (transformers {config_json['architectures'][0]})"

