"""MaskGIT transformer weights: valeoai/Maskgit-pytorch v1 `MaskTransformer` <-> eqvae-jax.

    python -m eqvae_jax.convert --kind maskgit --src MaskGIT_ImageNet_256.pth --dst weights/maskgit
    python -m eqvae_jax.convert --kind maskgit --src weights/maskgit --dst back.pth --to valeoai

Sources: the v1 trainer's checkpoint {'iter', 'global_epoch', 'model_state_dict', 'optimizer_state_dict'}
(`Trainer.save_network`; the 'model_state_dict' entry is read, `entry=` picks another) or a plain state dict
(.pth/.pt/.safetensors); a 'module.' (DDP) prefix is stripped. Width, depth, MLP size and the token grid
are read from the shapes. The split of the embedding rows into codes and classes is not (rows = codes + 1
+ classes + 1): `num_classes` (default 1000) or `codebook_size` decides. The head count is not in the
weights either: `num_heads` defaults to 16, what every v1 preset (base / big / huge) uses. Our own `--to valeoai`
exports store the config beside the weights (a top-level checkpoint entry or a safetensors header entry, which
v1's loader ignores), so they convert back without options.

`--to valeoai` writes a .pth/.pt in the v1 checkpoint layout ({'iter': 0, 'global_epoch': 0,
'model_state_dict': ...}, what v1's `--resume` reads; no optimizer state) or a plain .safetensors state dict.

Options (`--extra KEY=VALUE`): entry, num_heads, num_classes, codebook_size, dropout, compute_dtype.

google-research/maskgit's Flax checkpoints (class token first, post-LN BERT, vocabulary 2025, mask id -1)
are a different architecture and are not converted here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, Row
from eqvae_jax.convert.options import check_destination, check_target, typed_options
from eqvae_jax.convert.torch_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_state_dict,
    stored_note,
    strip_wrapper_prefixes,
    write_state_dict,
)
from eqvae_jax.models import maskgit
from eqvae_jax.models.maskgit import MaskGITConfig
from eqvae_jax.models.weights import KeyMismatchError, load_weights, save_weights, variable_shapes

KIND = maskgit.KIND
TARGETS = ("flax", "valeoai")
OPTIONS = {
    "entry": str,
    "num_heads": int,
    "num_classes": int,
    "codebook_size": int,
    "dropout": float,
    "compute_dtype": str,
}
DEFAULT_ENTRY = "model_state_dict"
CONFIG_NOTE = "eqvae_jax_maskgit_config"  # our --to valeoai exports: the MaskGITConfig JSON beside the weights
DEFAULT_HEADS = 16

_NORMS = [
    ("first_layer/norm_0", "first_layer.0"),
    ("first_layer/norm_4", "first_layer.4"),
    ("last_layer/norm_0", "last_layer.0"),
    ("last_layer/norm_4", "last_layer.4"),
    ("blocks/attn/norm", "transformer.layers.{i}.0.norm"),
    ("blocks/ff/norm", "transformer.layers.{i}.1.norm"),
]
_LINEARS = [
    ("first_layer/linear_2", "first_layer.2"),
    ("first_layer/linear_6", "first_layer.6"),
    ("last_layer/linear_2", "last_layer.2"),
    ("blocks/attn/mha/out_proj", "transformer.layers.{i}.0.fn.mha.out_proj"),
    ("blocks/ff/net_0", "transformer.layers.{i}.1.fn.net.0"),
    ("blocks/ff/net_3", "transformer.layers.{i}.1.fn.net.3"),
]
# (flax key, torch key, layout); '{i}' marks a per-layer key, stacked along axis 0 in flax (scanned blocks)
ROWS = (
    [
        Row("tok_emb/embedding", "tok_emb.weight"),
        Row("pos_emb", "pos_emb"),
        Row("bias", "bias"),
        Row("blocks/attn/mha/in_proj/kernel", "transformer.layers.{i}.0.fn.mha.in_proj_weight", "linear"),
        Row("blocks/attn/mha/in_proj/bias", "transformer.layers.{i}.0.fn.mha.in_proj_bias"),
    ]
    + [Row(f"{f}/scale", f"{t}.weight") for f, t in _NORMS]
    + [Row(f"{f}/bias", f"{t}.bias") for f, t in _NORMS]
    + [Row(f"{f}/kernel", f"{t}.weight", "linear") for f, t in _LINEARS]
    + [Row(f"{f}/bias", f"{t}.bias") for f, t in _LINEARS]
)


def flax_shapes(cfg: MaskGITConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the eqvae-jax model's variables for `cfg` (abstract init, no memory)."""
    return variable_shapes(maskgit.abstract(cfg))


def valeoai_shapes(cfg: MaskGITConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the v1 `MaskTransformer.state_dict()` for `cfg`, with its shape."""
    return KeyMap(ROWS, cfg.depth).torch_shapes(flax_shapes(cfg))


def valeoai_to_flax(sd: dict[str, np.ndarray], cfg: MaskGITConfig, what: str = "source") -> dict[str, np.ndarray]:
    """v1 state dict -> flat eqvae-jax variables; strict (names missing/unexpected/mis-shaped keys)."""
    return KeyMap(ROWS, cfg.depth).to_flax(sd, flax_shapes(cfg), what)


def flax_to_valeoai(flat: dict[str, np.ndarray], cfg: MaskGITConfig) -> dict[str, np.ndarray]:
    """Flat eqvae-jax variables -> v1 `MaskTransformer` state dict (float32, contiguous)."""
    return KeyMap(ROWS, cfg.depth).to_torch(flat, flax_shapes(cfg), "eqvae-jax weights")


def infer_config(sd: dict[str, np.ndarray], what: str, **options: Any) -> MaskGITConfig:
    """Width, depth, MLP size and token grid from the shapes; classes / heads from options (see module doc)."""
    needed = ["tok_emb.weight", "pos_emb", "transformer.layers.0.1.fn.net.0.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KeyMismatchError(f"{what}: cannot infer the MaskGIT size", missing=missing)
    rows, hidden = sd["tok_emb.weight"].shape
    positions = sd["pos_emb"].shape[1]
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise ValueError(f"{what}: pos_emb has {positions} positions, not a square token grid + 1 class token")
    if "codebook_size" in options:
        codebook = options["codebook_size"]
        classes = options.get("num_classes", rows - codebook - 2)
    else:
        classes = options.get("num_classes", 1000)
        codebook = rows - classes - 2
    if codebook < 1 or classes < 1 or codebook + classes + 2 != rows:
        raise ValueError(
            f"{what}: tok_emb has {rows} rows, not codebook_size + 1 + num_classes + 1 with codebook_size "
            f"{codebook} and num_classes {classes}; pass --extra num_classes=N or codebook_size=N"
        )
    heads = options.get("num_heads", DEFAULT_HEADS)
    if hidden % heads:
        raise ValueError(f"{what}: width {hidden} does not split into {heads} heads; pass --extra num_heads=N")
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))})
    return MaskGITConfig(
        hidden_dim=hidden,
        depth=depth,
        heads=heads,
        mlp_dim=sd["transformer.layers.0.1.fn.net.0.weight"].shape[0],
        codebook_size=codebook,
        grid_size=grid,
        num_classes=classes,
        dropout=options.get("dropout", 0.1),
        compute_dtype=options.get("compute_dtype", "float32"),
    )


def _describe(cfg: MaskGITConfig) -> str:
    name = next((n for n, make in maskgit.PRESETS.items() if make() == cfg), None)
    return (
        f"MaskGIT{f' {name}' if name else ''} (depth {cfg.depth}, width {cfg.hidden_dim}, heads {cfg.heads}, "
        f"MLP {cfg.mlp_dim}, {cfg.grid_size}x{cfg.grid_size} tokens, {cfg.codebook_size} codes, "
        f"{cfg.num_classes} classes)"
    )


def read_source(src: str, **options: Any) -> tuple[dict[str, np.ndarray], MaskGITConfig]:
    """(v1-layout state dict, config) from a v1 checkpoint or plain state-dict file."""
    sd = strip_wrapper_prefixes(read_state_dict(src, entry=options.get("entry", DEFAULT_ENTRY)))
    saved = stored_note(src, CONFIG_NOTE)
    if saved is not None:  # our own --to valeoai export: classes, codebook and heads are not in the shapes
        stored = MaskGITConfig.from_dict(json.loads(saved))
        defaults: dict[str, Any] = {"num_heads": stored.heads, "dropout": stored.dropout}
        if "num_classes" not in options and "codebook_size" not in options:
            defaults.update(num_classes=stored.num_classes, codebook_size=stored.codebook_size)
        options = {**defaults, **options}
    return sd, infer_config(sd, src, **options)


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: Any) -> str:
    """Convert between valeoai v1's MaskTransformer and an eqvae-jax weights directory."""
    check_target(KIND, to, TARGETS)
    opts = typed_options(KIND, options, OPTIONS)
    check_destination(dst, overwrite)
    if to == "flax":
        sd, cfg = read_source(src, **opts)
        flat = valeoai_to_flax(sd, cfg, what=src)
        with atomic_path(dst, overwrite) as tmp:
            save_weights(tmp, KIND, cfg.to_dict(), flat)
        return f"{_describe(cfg)}: {src} -> {dst}"
    if not dst.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise ValueError(f"{dst}: --to valeoai writes .safetensors or .pt/.pth/.ckpt/.bin")
    _, config, flat = load_weights(src, KIND)
    cfg = MaskGITConfig.from_dict(config)
    if cfg.class_token_first:
        raise ValueError(f"{src}: class_token_first=True has no valeoai v1 layout (v1 appends the class token)")
    sd = flax_to_valeoai(flat, cfg)
    with atomic_path(dst, overwrite) as tmp:
        write_state_dict(tmp, sd, like=dst, wrap=DEFAULT_ENTRY, extra={"iter": 0, "global_epoch": 0},
                         notes={CONFIG_NOTE: json.dumps(cfg.to_dict())})
    return f"{_describe(cfg)}: {src} -> {dst} (valeoai v1 MaskTransformer state dict)"
