"""DiT / SiT weights: official PyTorch checkpoints and diffusers `DiTTransformer2DModel` <-> eqvae-jax.

    python -m eqvae_jax.convert --kind dit --src DiT-XL-2-256x256.pt --dst weights/dit_xl2
    python -m eqvae_jax.convert --kind dit --src 0400000.pt --dst w --extra entry=model   # non-EMA weights
    python -m eqvae_jax.convert --kind dit --src hf_dit/transformer --dst w              # diffusers folder
    python -m eqvae_jax.convert --kind dit --src w --dst out.safetensors --to dit        # back (.pt too)

Sources: a state dict of the reference `DiT` class (facebookresearch/DiT `models.py`; SiT uses the same keys),
either plain or a training checkpoint {'model', 'ema', 'opt', 'args'} (the 'ema' entry by default), or a
diffusers directory (config.json + diffusion_pytorch_model.safetensors). Size, patch, channels, classes and
learned sigma are read from the shapes; the head count from the reference sizes (or `num_heads=`).

Options (`--extra KEY=VALUE`): entry, num_heads, num_classes, class_dropout_prob, timestep_freq_shift,
compute_dtype; for `--to dit`: allow_timestep_shift.

diffusers differences: its blocks each carry a copy of the timestep/class embedders (the official conversion
copies the same weights into all; differing copies are an error here, the block-0 copy is used) and its
timestep frequencies divide by (half - 1) instead of half. To reproduce the diffusers model exactly, a
diffusers source gets `timestep_freq_shift=1`; pass `timestep_freq_shift=0` for weights that were trained
with the official DiT code (e.g. facebook/DiT-XL-2-256). The MLP LayerNorm eps of diffusers' blocks comes
from its config (`norm_eps`, default 1e-5); ours is the official 1e-6 (reported in the summary if different).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, Row
from eqvae_jax.convert.options import check_destination, check_target, parse_bool, typed_options
from eqvae_jax.convert.torch_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_state_dict,
    strip_wrapper_prefixes,
    write_state_dict,
)
from eqvae_jax.models import dit
from eqvae_jax.models.dit import SIZES, DiTConfig, sincos_pos_embed_2d
from eqvae_jax.models.weights import KeyMismatchError, check_shapes, load_weights, save_weights, variable_shapes

KIND = dit.KIND
TARGETS = ("flax", "dit")
OPTIONS = {
    "entry": str,
    "num_heads": int,
    "num_classes": int,
    "class_dropout_prob": float,
    "timestep_freq_shift": int,
    "compute_dtype": str,
    "allow_timestep_shift": parse_bool,
}

# (flax key, torch key, layout); '{i}' marks a per-block key, stacked along axis 0 in flax (scanned blocks)
_GLOBAL = [
    Row("x_embedder/proj/kernel", "x_embedder.proj.weight", "conv"),
    Row("x_embedder/proj/bias", "x_embedder.proj.bias"),
    Row("pos_embed", "pos_embed"),
    Row("y_embedder/embedding_table/embedding", "y_embedder.embedding_table.weight"),
]
_LINEARS = [
    ("t_embedder/mlp_0", "t_embedder.mlp.0"),
    ("t_embedder/mlp_2", "t_embedder.mlp.2"),
    ("final_layer/linear", "final_layer.linear"),
    ("final_layer/adaLN_modulation_1", "final_layer.adaLN_modulation.1"),
    ("blocks/attn/qkv", "blocks.{i}.attn.qkv"),
    ("blocks/attn/proj", "blocks.{i}.attn.proj"),
    ("blocks/mlp/fc1", "blocks.{i}.mlp.fc1"),
    ("blocks/mlp/fc2", "blocks.{i}.mlp.fc2"),
    ("blocks/adaLN_modulation_1", "blocks.{i}.adaLN_modulation.1"),
]
ROWS = _GLOBAL + [Row(f"{f}/kernel", f"{t}.weight", "linear") for f, t in _LINEARS] + [
    Row(f"{f}/bias", f"{t}.bias") for f, t in _LINEARS
]


# ---------------------------------------------------------------------------------------------------------
# Official layout
# ---------------------------------------------------------------------------------------------------------


def flax_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the eqvae-jax model's variables for `cfg` (abstract init, no memory)."""
    return variable_shapes(dit.abstract(cfg))


def official_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the reference `DiT.state_dict()` for `cfg`, with its shape."""
    return KeyMap(ROWS, cfg.depth).torch_shapes(flax_shapes(cfg))


def official_to_flax(sd: dict[str, np.ndarray], cfg: DiTConfig, what: str = "source") -> dict[str, np.ndarray]:
    """Reference state dict -> flat eqvae-jax variables; strict (names missing/unexpected/mis-shaped keys)."""
    return KeyMap(ROWS, cfg.depth).to_flax(sd, flax_shapes(cfg), what)


def flax_to_official(flat: dict[str, np.ndarray], cfg: DiTConfig) -> dict[str, np.ndarray]:
    """Flat eqvae-jax variables -> reference `DiT` state dict (float32, contiguous)."""
    return KeyMap(ROWS, cfg.depth).to_torch(flat, flax_shapes(cfg), "eqvae-jax weights")


def infer_config(sd: dict[str, np.ndarray], what: str, **options: Any) -> DiTConfig:
    """Read depth, hidden size, patch, channels, classes and learned sigma off a reference state dict."""
    needed = [
        "x_embedder.proj.weight",
        "final_layer.linear.weight",
        "y_embedder.embedding_table.weight",
        "pos_embed",
    ]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KeyMismatchError(f"{what}: cannot infer the DiT size", missing=missing)
    hidden, cin, p, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{what}: pos_embed has {tokens} tokens, not a square grid")
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out not in (cin, 2 * cin):
        raise ValueError(f"{what}: final layer gives {out} channels for {cin} input channels")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    num_classes = options.get("num_classes", rows - 1)
    dropout = options.get("class_dropout_prob", 0.1 if rows == num_classes + 1 else 0.0)
    return DiTConfig(
        input_size=grid * p,
        patch_size=p,
        in_channels=cin,
        hidden_size=hidden,
        depth=depth,
        num_heads=_heads(hidden, options, what),
        mlp_ratio=mlp_ratio,
        class_dropout_prob=dropout,
        num_classes=num_classes,
        learn_sigma=out == 2 * cin,
        timestep_freq_shift=options.get("timestep_freq_shift", 0),
        compute_dtype=options.get("compute_dtype", "float32"),
    )


def _heads(hidden: int, options: dict[str, Any], what: str) -> int:
    if "num_heads" in options:
        return options["num_heads"]
    by_hidden = {h: n for _, h, n in SIZES.values()}
    if hidden not in by_hidden:
        raise ValueError(
            f"{what}: hidden size {hidden} is not a reference DiT size; pass --extra num_heads=N"
        )
    return by_hidden[hidden]


# ---------------------------------------------------------------------------------------------------------
# diffusers layout
# ---------------------------------------------------------------------------------------------------------

_DIFFUSERS_EMB = {
    "norm1.emb.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "norm1.emb.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "norm1.emb.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "norm1.emb.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "norm1.emb.class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
_DIFFUSERS_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_GLOBAL = {
    "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias",
    "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight",
    "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
    "proj_out_2.weight": "final_layer.linear.weight",
    "proj_out_2.bias": "final_layer.linear.bias",
}


def diffusers_config(path: str, **options: Any) -> tuple[DiTConfig, list[str]]:
    """Our config for a diffusers DiTTransformer2DModel directory, plus notes on what differs."""
    with open(os.path.join(path, "config.json")) as f:
        dc = json.load(f)
    expect = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, value in expect.items():
        if dc.get(key, value) != value:
            raise ValueError(f"{path}: diffusers {key}={dc[key]!r} is not a DiT (expected {value!r})")
    if dc.get("num_embeds_ada_norm") is None:
        raise ValueError(f"{path}: num_embeds_ada_norm is None; not a class-conditional DiT")
    cin = dc.get("in_channels", 4)
    out = dc.get("out_channels") or cin
    if out not in (cin, 2 * cin):
        raise ValueError(f"{path}: {out} output channels for {cin} input channels")
    cfg = DiTConfig(
        input_size=dc.get("sample_size", 32),
        patch_size=dc.get("patch_size", 2),
        in_channels=cin,
        hidden_size=dc.get("num_attention_heads", 16) * dc.get("attention_head_dim", 72),
        depth=dc.get("num_layers", 28),
        num_heads=dc.get("num_attention_heads", 16),
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=dc["num_embeds_ada_norm"],
        learn_sigma=out == 2 * cin,
        timestep_freq_shift=options.get("timestep_freq_shift", 1),
        compute_dtype=options.get("compute_dtype", "float32"),
    )
    notes = []
    if dc.get("norm_eps", 1e-5) != 1e-6:
        notes.append(f"diffusers MLP LayerNorm eps {dc.get('norm_eps', 1e-5)} -> 1e-6 (official DiT)")
    return cfg, notes


def diffusers_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of diffusers' `DiTTransformer2DModel.state_dict()` for `cfg`, with its shape."""
    off = official_shapes(cfg)
    shapes = {dk: off[ok] for dk, ok in _DIFFUSERS_GLOBAL.items()}
    d = cfg.hidden_size
    for i in range(cfg.depth):
        pre = f"transformer_blocks.{i}."
        shapes.update({pre + dk: off[ok] for dk, ok in _DIFFUSERS_EMB.items()})
        for dk, ok in _DIFFUSERS_BLOCK.items():
            shapes[f"{pre}{dk}.weight"] = off[f"blocks.{i}.{ok}.weight"]
            shapes[f"{pre}{dk}.bias"] = off[f"blocks.{i}.{ok}.bias"]
        for qkv in ("to_q", "to_k", "to_v"):
            shapes[f"{pre}attn1.{qkv}.weight"] = (d, d)
            shapes[f"{pre}attn1.{qkv}.bias"] = (d,)
    return shapes


def diffusers_to_official(sd: dict[str, np.ndarray], cfg: DiTConfig, what: str) -> dict[str, np.ndarray]:
    """diffusers state dict -> `DiT` state dict (pos_embed recomputed; diffusers does not save it)."""
    check_shapes(what, {k: np.shape(v) for k, v in sd.items()}, diffusers_shapes(cfg))
    out = {ok: sd[dk] for dk, ok in _DIFFUSERS_GLOBAL.items()}
    out.update({ok: sd[f"transformer_blocks.0.{dk}"] for dk, ok in _DIFFUSERS_EMB.items()})
    for i in range(cfg.depth):
        pre = f"transformer_blocks.{i}."
        for dk in _DIFFUSERS_EMB:
            if not np.array_equal(sd[pre + dk], sd["transformer_blocks.0." + dk]):
                raise ValueError(
                    f"{what}: {pre + dk} differs from block 0; the DiT architecture shares one "
                    "timestep/class embedder (diffusers keeps per-block copies)"
                )
        for dk, ok in _DIFFUSERS_BLOCK.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{ok}.{leaf}"] = sd[f"{pre}{dk}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
                [sd[f"{pre}attn1.{n}.{leaf}"] for n in ("to_q", "to_k", "to_v")], axis=0
            )
    grid = cfg.input_size // cfg.patch_size
    out["pos_embed"] = sincos_pos_embed_2d(cfg.hidden_size, grid)[None]
    return out


def _diffusers_weights_file(path: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: no diffusion_pytorch_model.safetensors (or .bin) in the directory")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def _describe(cfg: DiTConfig) -> str:
    name = next(
        (
            f"DiT-{s}/{cfg.patch_size}"
            for s, (dep, h, n) in SIZES.items()
            if (dep, h, n) == (cfg.depth, cfg.hidden_size, cfg.num_heads)
        ),
        "DiT",
    )
    return (
        f"{name} (depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, patch "
        f"{cfg.patch_size}, input {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}, "
        f"{cfg.num_classes} classes, learn_sigma={cfg.learn_sigma})"
    )


def read_source(src: str, **options: Any) -> tuple[dict[str, np.ndarray], DiTConfig, list[str]]:
    """(reference-layout state dict, config, notes) from an official checkpoint file or a diffusers folder."""
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(
                f"{src}: a directory source must be a diffusers model (config.json missing)"
            )
        cfg, notes = diffusers_config(src, **options)
        sd = read_state_dict(_diffusers_weights_file(src))
        return diffusers_to_official(sd, cfg, src), cfg, notes
    sd = strip_wrapper_prefixes(read_state_dict(src, entry=options.get("entry", "ema")))
    return sd, infer_config(sd, src, **options), []


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: Any) -> str:
    """Convert between the official / diffusers DiT layouts and an eqvae-jax weights directory."""
    check_target(KIND, to, TARGETS)
    opts = typed_options(KIND, options, OPTIONS)
    check_destination(dst, overwrite)
    if to == "flax":
        sd, cfg, notes = read_source(src, **opts)
        flat = official_to_flax(sd, cfg, what=src)
        with atomic_path(dst, overwrite) as tmp:
            save_weights(tmp, KIND, dataclasses.asdict(cfg), flat)
        extra = f"; note: {'; '.join(notes)}" if notes else ""
        return f"{_describe(cfg)}: {src} -> {dst}{extra}"
    if to == "dit":
        _, config, flat = load_weights(src, KIND)
        cfg = DiTConfig(**config)
        if cfg.timestep_freq_shift and not opts.get("allow_timestep_shift", False):
            raise ValueError(
                f"{src} uses timestep_freq_shift={cfg.timestep_freq_shift} (diffusers' embedding); "
                "the official DiT class computes shift 0. Pass allow_timestep_shift=1 to write anyway."
            )
        sd = flax_to_official(flat, cfg)
        if not dst.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            raise ValueError(f"{dst}: --to dit writes .safetensors or .pt/.pth/.ckpt/.bin")
        with atomic_path(dst, overwrite) as tmp:
            write_state_dict(tmp, sd, like=dst)
        return f"{_describe(cfg)}: {src} -> {dst} (reference DiT state dict)"
