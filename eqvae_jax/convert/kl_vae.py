"""KL-VAE conversion: `python -m eqvae_jax.convert --kind kl_vae --src SRC --dst DST [--to T] [--extra K=V]`.

--to flax (default), SRC one of:
  * a diffusers `AutoencoderKL` directory: config.json + diffusion_pytorch_model.safetensors (or .bin); a
    pipeline root with a `vae/` subfolder also works. The architecture comes from config.json.
  * an LDM/CompVis state dict file (.ckpt/.pt/.pth/.bin with torch, .safetensors without), keys with or
    without the `first_stage_model.` prefix (with it, all other keys, e.g. the diffusion model's, are
    ignored). `loss.*` keys (LPIPS, discriminator, logvar) are skipped and reported. The architecture is
    inferred from weight shapes: base channels, channel multipliers, res blocks per level, in/out/latent
    channels, mid attention and quant convs. What shapes cannot tell comes from defaults (GroupNorm 32
    groups, eps 1e-6, scaling_factor 0.18215, shift_factor 0.0, sample_size 256) or `--extra FIELD=VALUE`
    (any `KLVAEConfig` field), or `--extra preset=sd_vae|sdxl_vae|sd3_vae|tiny` to start from a preset
    instead of inferring.
--to diffusers: SRC a Flax weights directory; DST a directory that `diffusers.AutoencoderKL.from_pretrained`
    loads.
--to ldm: SRC a Flax weights directory; DST a `.safetensors` LDM state dict (attention as 1x1 convs, no
    prefix).

Missing, unexpected or mis-shaped keys raise `KeyMismatchError` naming them. Output is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from eqvae_jax.convert import kl_vae_keys as keys
from eqvae_jax.convert import ldm_keys
from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import describe_skipped
from eqvae_jax.convert.options import check_destination, check_target, dataclass_parsers, typed_options
from eqvae_jax.convert.torch_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_state_dict,
    safetensors_metadata,
    write_safetensors,
)
from eqvae_jax.models import kl_vae, weights
from eqvae_jax.models.kl_vae import KLVAEConfig

TARGETS = ("flax", "diffusers", "ldm")
CONFIG_METADATA = "eqvae_jax.kl_vae_config"  # safetensors header entry of a --to ldm export: the KLVAEConfig JSON
OPTIONS = {"preset": str, **dataclass_parsers(KLVAEConfig)}  # LDM sources: a preset and/or any config field
LDM_PREFIX = "first_stage_model."
SKIPPED_PREFIX = "loss."
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DIFFUSERS_EPS = 1e-6  # diffusers hard-codes GroupNorm eps=1e-6 in AutoencoderKL
VQ_CODEBOOK_KEY = "quantize.embedding.weight"  # taming VQModel: the sign of a VQ checkpoint


# ---------------------------------------------------------------------------------------------- reading


def detect_format(src: str) -> str:
    """'flax' (eqvae-jax weights dir), 'diffusers' (AutoencoderKL dir) or 'ldm' (state dict file)."""
    if os.path.isdir(src):
        for d in (src, os.path.join(src, "vae")):
            path = os.path.join(d, DIFFUSERS_CONFIG)
            if os.path.isfile(path):
                with open(path) as f:
                    meta = json.load(f)
                return "flax" if meta.get("format") == weights.FORMAT else "diffusers"
        raise ValueError(f"{src}: a directory without config.json (or vae/config.json) is neither a "
                         "diffusers AutoencoderKL nor an eqvae-jax weights directory.")
    if os.path.isfile(src):
        if src.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            return "ldm"
        raise ValueError(f"{src}: unknown weights file format; an LDM state dict must end with one of "
                         f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}.")
    raise FileNotFoundError(f"{src} does not exist.")


def config_from_diffusers(d: Mapping[str, Any]) -> KLVAEConfig:
    """KLVAEConfig from a diffusers AutoencoderKL config.json dict; unsupported options are a ValueError."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"diffusers config is a {d['_class_name']!r}, not an 'AutoencoderKL'.")
    channels = list(d.get("block_out_channels", (64,)))
    n = len(channels)
    down = list(d.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(d.get("up_block_types", ("UpDecoderBlock2D",)))
    problems = []
    if down != ["DownEncoderBlock2D"] * n:
        problems.append(f"down_block_types={down}")
    if up != ["UpDecoderBlock2D"] * n:
        problems.append(f"up_block_types={up}")
    if d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={d['act_fn']!r}")
    if any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels} (not multiples of the first)")
    if problems:
        raise ValueError("unsupported diffusers AutoencoderKL config: " + ", ".join(problems))
    return KLVAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        base_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=d.get("layers_per_block", 1),
        latent_channels=d.get("latent_channels", 4),
        mid_attention=d.get("mid_block_add_attention", True),
        norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=_DIFFUSERS_EPS,
        use_quant_conv=d.get("use_quant_conv", True),
        use_post_quant_conv=d.get("use_post_quant_conv", True),
        scaling_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor") or 0.0,
        sample_size=d.get("sample_size", 32),
    )


def config_to_diffusers(cfg: KLVAEConfig) -> dict[str, Any]:
    """The diffusers AutoencoderKL config.json for `cfg`; a ValueError if diffusers cannot express it."""
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"diffusers AutoencoderKL needs channel_mult[0] == 1, got {cfg.channel_mult}.")
    if cfg.norm_eps != _DIFFUSERS_EPS:
        raise ValueError(f"diffusers AutoencoderKL fixes GroupNorm eps to 1e-6, got {cfg.norm_eps}.")
    n = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


def read_diffusers(src: str) -> tuple[KLVAEConfig, dict[str, np.ndarray]]:
    """(config, flat Flax variables) of a diffusers AutoencoderKL directory (or a pipeline root with vae/)."""
    if not os.path.isfile(os.path.join(src, DIFFUSERS_CONFIG)) and os.path.isdir(os.path.join(src, "vae")):
        src = os.path.join(src, "vae")
    with open(os.path.join(src, DIFFUSERS_CONFIG)) as f:
        cfg = config_from_diffusers(json.load(f))
    files = [os.path.join(src, name) for name in DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(src, name))]
    if not files:
        found = sorted(os.listdir(src))
        raise FileNotFoundError(f"{src}: no {' or '.join(DIFFUSERS_WEIGHTS)} (found {found}).")
    state_dict = keys.rename_legacy_diffusers(read_state_dict(files[0]))
    return cfg, keys.torch_to_flax(state_dict, cfg, "diffusers", what=files[0])


def ldm_config(state_dict: Mapping[str, np.ndarray], what: str = "LDM state dict",
               **options: Any) -> KLVAEConfig:
    """The architecture of an LDM KL autoencoder state dict (prefix and loss.* already removed).

    Inferred from shapes unless `preset=NAME` is given; other options override single `KLVAEConfig` fields.
    """
    options = typed_options(kl_vae.KIND, options, OPTIONS)
    preset = options.pop("preset", None)
    if preset is not None:
        if preset not in kl_vae.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(kl_vae.PRESETS)}.")
        cfg = kl_vae.PRESETS[preset]()
    else:
        cfg = _infer_ldm_config(state_dict, what)
    return dataclasses.replace(cfg, **options)


def _infer_ldm_config(sd: Mapping[str, np.ndarray], what: str) -> KLVAEConfig:
    if VQ_CODEBOOK_KEY in sd:
        raise ValueError(f"{what} is a VQ autoencoder ({VQ_CODEBOOK_KEY} {tuple(np.shape(sd[VQ_CODEBOOK_KEY]))}), "
                         "not a KL one: use --kind vq_vae.")
    t = ldm_keys.infer_trunk(sd, what)
    if t["encoder_out"] != 2 * t["decoder_in"]:
        raise ValueError(f"{what}: encoder.conv_out gives {t['encoder_out']} channels but decoder.conv_in takes "
                         f"{t['decoder_in']}; a KL autoencoder's encoder outputs mean and logvar (2 x latent "
                         "channels). A VQ autoencoder (double_z=False) converts with --kind vq_vae.")
    return KLVAEConfig(
        in_channels=t["in_channels"],
        out_channels=t["out_channels"],
        base_channels=t["base_channels"],
        channel_mult=t["channel_mult"],
        num_res_blocks=t["num_res_blocks"],
        latent_channels=t["decoder_in"],
        mid_attention=t["mid_attention"],
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )


@dataclasses.dataclass
class LDMRead:
    """Result of reading an LDM checkpoint: config, Flax variables and what was left out."""

    config: KLVAEConfig
    flat: dict[str, np.ndarray]
    skipped: list[str]  # loss.* keys (LPIPS, discriminator, logvar), not part of the autoencoder
    ignored: int  # keys outside `first_stage_model.` in a full LDM/SD checkpoint


def read_ldm(src: str, **options: Any) -> LDMRead:
    """Read an LDM/CompVis KL autoencoder state dict file into Flax variables (see the module docstring)."""
    raw = read_state_dict(src)
    ignored = 0
    if any(k.startswith(LDM_PREFIX) for k in raw):
        ignored = sum(not k.startswith(LDM_PREFIX) for k in raw)
        raw = {k[len(LDM_PREFIX):]: v for k, v in raw.items() if k.startswith(LDM_PREFIX)}
    skipped = sorted(k for k in raw if k.startswith(SKIPPED_PREFIX))
    state_dict = {k: v for k, v in raw.items() if not k.startswith(SKIPPED_PREFIX)}
    saved = safetensors_metadata(src).get(CONFIG_METADATA)
    if saved is not None and "preset" not in options:  # our own --to ldm export: its exact architecture
        cfg = dataclasses.replace(KLVAEConfig.from_dict(json.loads(saved)),
                                  **typed_options(kl_vae.KIND, options, OPTIONS))
    else:
        cfg = ldm_config(state_dict, what=src, **options)
    return LDMRead(cfg, keys.torch_to_flax(state_dict, cfg, "ldm", what=src), skipped, ignored)


# ---------------------------------------------------------------------------------------------- writing


def write_flax(dst: str, cfg: KLVAEConfig, flat: Mapping[str, np.ndarray], overwrite: bool = False) -> None:
    with atomic_path(dst, overwrite) as tmp:
        weights.save_weights(tmp, kl_vae.KIND, cfg.to_dict(), flat)


def write_diffusers(dst: str, cfg: KLVAEConfig, flat: Mapping[str, np.ndarray],
                    overwrite: bool = False) -> None:
    config = config_to_diffusers(cfg)
    state_dict = keys.flax_to_torch(flat, cfg, "diffusers")
    with atomic_path(dst, overwrite) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, DIFFUSERS_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        write_safetensors(os.path.join(tmp, DIFFUSERS_WEIGHTS[0]), state_dict)


def write_ldm(dst: str, cfg: KLVAEConfig, flat: Mapping[str, np.ndarray], overwrite: bool = False) -> None:
    if not dst.endswith(SAFETENSORS_SUFFIXES):
        raise ValueError(f"--to ldm writes a safetensors file; DST must end with .safetensors, got {dst!r}.")
    state_dict = keys.flax_to_torch(flat, cfg, "ldm")
    with atomic_path(dst, overwrite) as tmp:  # with the config: norm_num_groups is not in the weight shapes
        write_safetensors(tmp, state_dict, {CONFIG_METADATA: json.dumps(dataclasses.asdict(cfg))})


def _read_flax(src: str) -> tuple[KLVAEConfig, dict[str, np.ndarray]]:
    _, config, flat = weights.load_weights(src, kl_vae.KIND)
    return KLVAEConfig.from_dict(config), flat


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: Any) -> str:
    """Convert between PyTorch KL-VAE weights and a Flax weights directory; returns a one-line summary."""
    check_target(kl_vae.KIND, to, TARGETS)
    options = typed_options(kl_vae.KIND, options, OPTIONS)
    fmt = detect_format(src)
    check_destination(dst, overwrite)
    if options and fmt != "ldm":
        raise ValueError(f"--extra options {sorted(options)} only apply to an LDM state dict source, "
                         f"not a {fmt} source.")
    notes = []
    if to == "flax":
        if fmt == "flax":
            raise ValueError(f"{src} is already an eqvae-jax weights directory; "
                             "use --to diffusers or --to ldm.")
        if fmt == "diffusers":
            cfg, flat = read_diffusers(src)
        else:
            got = read_ldm(src, **options)
            cfg, flat = got.config, got.flat
            if got.skipped:
                notes.append(f"skipped {len(got.skipped)} loss keys: {describe_skipped(got.skipped)}")
            if got.ignored:
                notes.append(f"ignored {got.ignored} keys outside {LDM_PREFIX}*")
        write_flax(dst, cfg, flat, overwrite)
    else:
        if fmt != "flax":
            raise ValueError(f"--to {to} needs an eqvae-jax weights directory as --src; "
                             f"{src} is {fmt} format.")
        cfg, flat = _read_flax(src)
        (write_diffusers if to == "diffusers" else write_ldm)(dst, cfg, flat, overwrite)
    n_params = sum(int(np.prod(np.shape(v))) for v in flat.values())
    notes.append(f"config {json.dumps(cfg.to_dict(), separators=(',', ':'))}")
    head = f"kl_vae: {fmt} {src} -> {to} {dst} ({len(flat)} tensors, {n_params / 1e6:.2f}M params)"
    return "; ".join([head, *notes])
