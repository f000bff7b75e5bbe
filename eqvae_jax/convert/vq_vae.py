"""VQ-VAE conversion: `python -m eqvae_jax.convert --kind vq_vae --src SRC --dst DST [--to T] [--extra K=V]`.

--to flax (default): SRC a taming `VQModel` checkpoint: a Lightning `last.ckpt` ({'state_dict': ...}, read with
    `weights_only=True`; optimizer states, callbacks and hyper-parameters are ignored), a bare state dict
    (.pt/.pth/.bin), or a .safetensors file; keys with or without the `first_stage_model.` prefix (taming's
    transformer checkpoints). `loss.*` keys (LPIPS, discriminator) are skipped and reported; the discriminator
    converts with `--kind discriminator`. The architecture comes from, in this order:
      * `--extra preset=taming_f16_n1024|tiny`;
      * `--extra yaml=PATH`, or a `model.yaml` next to SRC: taming's config layout
        (model.params.{embed_dim, n_embed, ddconfig: {ch, ch_mult, num_res_blocks, attn_resolutions,
        resolution, z_channels, double_z, in_channels, out_ch, dropout}});
      * otherwise the weight shapes (levels, channels, res blocks, z/embed/codebook sizes, which levels have
        attention); `resolution` (which shapes cannot tell; it places attention) defaults to 256.
    Any `VQVAEConfig` field given as `--extra FIELD=VALUE` overrides the result.
--to taming: SRC a Flax weights directory; DST a `.safetensors` or `.ckpt`/`.pt`/`.pth` file ({'state_dict':
    ...}) with taming's `VQModel` keys (attention as 1x1 convs), which `Encoder`, `Decoder`,
    `VectorQuantizer2` and the quant convs load with strict=True; or a directory, which gets `last.ckpt` and
    a `model.yaml` in taming's layout (`lossconfig` is taming's DummyLoss: the loss weights are not part of
    the autoencoder), the pair `--to flax` reads back.

Errors name what is wrong before anything is written: missing / unexpected / mis-shaped keys
(`KeyMismatchError`), a KL checkpoint (use --kind kl_vae), a model.yaml or --extra that disagrees with the
weights (the codebook size, channels), options taming cannot express. Output is written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import yaml

from eqvae_jax.convert import ldm_keys
from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, describe_skipped
from eqvae_jax.convert.options import (
    UsageError,
    check_destination,
    check_target,
    dataclass_parsers,
    typed_options,
)
from eqvae_jax.convert.torch_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_state_dict,
    stored_note,
    write_safetensors,
    write_torch_checkpoint,
)
from eqvae_jax.models import vq_vae, weights
from eqvae_jax.models.vq_vae import VQVAEConfig

TARGETS = ("flax", "taming")
OPTIONS = {"preset": str, "yaml": str, **dataclass_parsers(VQVAEConfig)}
PREFIX = "first_stage_model."
SKIPPED_PREFIX = "loss."
CODEBOOK_KEY = "quantize.embedding.weight"
YAML_NAME = "model.yaml"
CONFIG_NOTE = "eqvae_jax_vq_vae_config"  # --to taming file exports: the VQVAEConfig JSON beside the weights
CKPT_NAME = "last.ckpt"
TAMING_TARGET = "taming.models.vqgan.VQModel"
TAMING_DEFAULT_RESOLUTION = 256
_TAMING_NORM = (32, 1e-6)  # taming's Normalize: GroupNorm(32, eps=1e-6), not configurable
_DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                  "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "give_pre_end"}
_IGNORED_PARAMS = {"ddconfig", "lossconfig", "n_embed", "embed_dim", "ckpt_path", "ignore_keys", "image_key",
                   "colorize_nlabels", "monitor", "remap", "sane_index_shape"}


# ---------------------------------------------------------------------------------------------- key map


def module_rows(cfg: VQVAEConfig) -> list[tuple[str, str, str]]:
    """(taming prefix, diffusers-style prefix, kind) of every module but the codebook."""
    return [*ldm_keys.trunk_rows(cfg.trunk()), ("quant_conv", "quant_conv", "conv"),
            ("post_quant_conv", "post_quant_conv", "conv")]


def key_map(cfg: VQVAEConfig) -> KeyMap:
    """Rows (Flax key, taming key, tensor layout) of every parameter of a VQVAE with config `cfg`."""
    km = ldm_keys.key_map(module_rows(cfg), "ldm")
    return KeyMap([*km.rows, ("quantize/embedding", CODEBOOK_KEY, None)])


def model_shapes(cfg: VQVAEConfig) -> dict[str, tuple[int, ...]]:
    """{Flax key: shape} of a VQVAE with config `cfg` (shape-only, nothing is allocated)."""
    return dict(_model_shapes(dataclasses.replace(cfg, dtype="float32")))


@functools.lru_cache(maxsize=16)
def _model_shapes(cfg: VQVAEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(weights.variable_shapes(vq_vae.abstract(cfg)).items())


def torch_to_flax(state_dict: Mapping[str, np.ndarray], cfg: VQVAEConfig,
                  what: str = "state dict") -> dict[str, np.ndarray]:
    """A taming VQModel state dict (no loss.* keys) -> flat float32 Flax variables; strict (names keys)."""
    km = key_map(cfg)
    return km.to_flax(ldm_keys.squeeze_attention(state_dict, km), model_shapes(cfg), what)


def flax_to_torch(flat: Mapping[str, np.ndarray], cfg: VQVAEConfig,
                  what: str = "Flax weights") -> dict[str, np.ndarray]:
    """Flat Flax variables -> a float32 taming VQModel state dict (attention as 1x1 convs)."""
    km = key_map(cfg)
    return ldm_keys.unsqueeze_attention(km.to_torch(flat, model_shapes(cfg), what), km)


# ---------------------------------------------------------------------------------------------- configs


def config_from_taming_yaml(path: str) -> VQVAEConfig:
    """VQVAEConfig from a taming model config (`model.params.ddconfig` etc.); unsupported settings are errors."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    model = doc.get("model", doc) if isinstance(doc, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping) or not isinstance(params.get("ddconfig"), Mapping):
        raise ValueError(f"{path}: not a taming model config (no model.params.ddconfig).")
    target = str(model.get("target", TAMING_TARGET))
    if target.rsplit(".", 1)[-1] != "VQModel":
        raise ValueError(f"{path}: model.target is {target!r}; only taming's VQModel converts with --kind vq_vae.")
    dd = params["ddconfig"]
    problems = []
    unknown = sorted(set(dd) - _DDCONFIG_KEYS)
    if unknown:
        problems.append(f"unknown ddconfig keys {unknown}")
    if dd.get("double_z", True):
        problems.append("ddconfig.double_z is true (a KL autoencoder's encoder; use --kind kl_vae)")
    if not dd.get("resamp_with_conv", True):
        problems.append("ddconfig.resamp_with_conv=false")
    if dd.get("give_pre_end", False):
        problems.append("ddconfig.give_pre_end=true")
    if params.get("remap") is not None:
        problems.append(f"remap={params['remap']!r} (index remapping)")
    unknown_params = sorted(set(params) - _IGNORED_PARAMS)
    if unknown_params:
        problems.append(f"unknown model.params keys {unknown_params}")
    if problems:
        raise ValueError(f"{path}: unsupported taming config: " + "; ".join(problems))
    try:
        return VQVAEConfig(
            in_channels=int(dd["in_channels"]),
            out_channels=int(dd["out_ch"]),
            base_channels=int(dd["ch"]),
            channel_mult=tuple(dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(dd["attn_resolutions"]),
            resolution=int(dd["resolution"]),
            z_channels=int(dd["z_channels"]),
            embed_dim=int(params["embed_dim"]),
            n_embed=int(params["n_embed"]),
        )
    except KeyError as e:
        raise ValueError(f"{path}: taming config without {e.args[0]!r}.") from e


def config_to_taming_yaml(cfg: VQVAEConfig) -> dict[str, Any]:
    """The taming model config of `cfg` (a ValueError for what taming cannot express)."""
    if (cfg.norm_num_groups, cfg.norm_eps) != _TAMING_NORM:
        raise ValueError(f"taming fixes GroupNorm(32, eps=1e-6); this model has ({cfg.norm_num_groups}, "
                         f"{cfg.norm_eps}).")
    return {"model": {
        "target": TAMING_TARGET,
        "params": {
            "embed_dim": cfg.embed_dim,
            "n_embed": cfg.n_embed,
            "ddconfig": {
                "double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
                "in_channels": cfg.in_channels, "out_ch": cfg.out_channels, "ch": cfg.base_channels,
                "ch_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
                "attn_resolutions": list(cfg.attn_resolutions), "dropout": 0.0,
            },
            "lossconfig": {"target": "taming.modules.losses.DummyLoss"},
        },
    }}


def infer_config(sd: Mapping[str, np.ndarray], what: str, resolution: int = TAMING_DEFAULT_RESOLUTION
                 ) -> VQVAEConfig:
    """The architecture of a taming VQModel state dict from its shapes (`resolution` places the attention)."""
    t = ldm_keys.infer_trunk(sd, what)
    if CODEBOOK_KEY not in sd:
        if t["encoder_out"] == 2 * t["decoder_in"]:
            raise ValueError(f"{what} is a KL autoencoder (no {CODEBOOK_KEY}; encoder.conv_out gives 2 x "
                             f"{t['decoder_in']} channels: mean and logvar): use --kind kl_vae.")
        raise weights.KeyMismatchError(f"{what} (inferring the architecture)", missing=[CODEBOOK_KEY])
    missing = [k for k in ("quant_conv.weight", "post_quant_conv.weight") if k not in sd]
    if missing:
        raise weights.KeyMismatchError(f"{what} (inferring the architecture)", missing=missing)
    n_embed, embed_dim = np.shape(sd[CODEBOOK_KEY])
    return VQVAEConfig(
        in_channels=t["in_channels"],
        out_channels=t["out_channels"],
        base_channels=t["base_channels"],
        channel_mult=t["channel_mult"],
        num_res_blocks=t["num_res_blocks"],
        attn_resolutions=tuple(resolution // 2 ** i for i in t["attention_levels"]),
        resolution=resolution,
        z_channels=t["decoder_in"],
        embed_dim=int(embed_dim),
        n_embed=int(n_embed),
    )


def check_against_weights(cfg: VQVAEConfig, sd: Mapping[str, np.ndarray], source: str, what: str) -> None:
    """Clear errors for a config (from `source`) that disagrees with the weights on the codebook or on whether
    this is a VQ model at all; everything else is left to the strict key map."""
    if CODEBOOK_KEY not in sd:
        t = ldm_keys.infer_trunk(sd, what)
        kl = t["encoder_out"] == 2 * t["decoder_in"]
        hint = " It looks like a KL autoencoder: use --kind kl_vae." if kl else ""
        raise weights.KeyMismatchError(f"{what}: no codebook.{hint}", missing=[CODEBOOK_KEY])
    shape = tuple(np.shape(sd[CODEBOOK_KEY]))
    if shape != (cfg.n_embed, cfg.embed_dim):
        raise ValueError(f"{what}: codebook size mismatch: the weights hold {shape[0]} codes of dimension "
                         f"{shape[1] if len(shape) > 1 else '?'} ({CODEBOOK_KEY} {shape}), {source} says "
                         f"n_embed={cfg.n_embed}, embed_dim={cfg.embed_dim}.")


# ---------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class TamingRead:
    """Result of reading a taming checkpoint: config (and where it came from), Flax variables, what was left."""

    config: VQVAEConfig
    source: str
    flat: dict[str, np.ndarray]
    skipped: list[str]  # loss.* keys (LPIPS, discriminator)
    ignored: int  # keys outside `first_stage_model.` in a transformer checkpoint


def read_taming(src: str, **options: Any) -> TamingRead:
    """Read a taming VQModel checkpoint into Flax variables (see the module docstring for the options)."""
    options = typed_options(vq_vae.KIND, options, OPTIONS)
    preset, yaml_path = options.pop("preset", None), options.pop("yaml", None)
    if preset is not None and yaml_path is not None:
        raise UsageError("--extra preset and --extra yaml are exclusive.")
    raw = read_state_dict(src)
    ignored = 0
    if any(k.startswith(PREFIX) for k in raw):
        ignored = sum(not k.startswith(PREFIX) for k in raw)
        raw = {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(PREFIX)}
    skipped = sorted(k for k in raw if k.startswith(SKIPPED_PREFIX))
    sd = {k: v for k, v in raw.items() if not k.startswith(SKIPPED_PREFIX)}
    beside = os.path.join(os.path.dirname(os.path.abspath(src)), YAML_NAME)
    if yaml_path is None and preset is None and os.path.isfile(beside):
        yaml_path = beside
    if preset is not None:
        if preset not in vq_vae.PRESETS:
            raise UsageError(f"unknown preset {preset!r}; expected one of {sorted(vq_vae.PRESETS)}.")
        cfg, source = vq_vae.PRESETS[preset](), f"preset {preset}"
    elif yaml_path is not None:
        if not os.path.isfile(yaml_path):
            raise FileNotFoundError(f"--extra yaml={yaml_path}: no such file.")
        cfg, source = config_from_taming_yaml(yaml_path), yaml_path
    elif (saved := stored_note(src, CONFIG_NOTE)) is not None:  # our own --to taming file export
        cfg, source = VQVAEConfig.from_dict(json.loads(saved)), "the config stored in the file"
    else:
        cfg = infer_config(sd, src, options.get("resolution", TAMING_DEFAULT_RESOLUTION))
        source = "the weight shapes"
    if options:
        cfg = dataclasses.replace(cfg, **options)
        source += " + --extra " + ",".join(sorted(options))
    check_against_weights(cfg, sd, source, src)
    flat = torch_to_flax(sd, cfg, what=f"{src} (architecture from {source})")
    return TamingRead(cfg, source, flat, skipped, ignored)


def _read_flax(src: str) -> tuple[VQVAEConfig, dict[str, np.ndarray]]:
    _, config, flat = weights.load_weights(src, vq_vae.KIND)
    return VQVAEConfig.from_dict(config), flat


def detect_format(src: str) -> str:
    """'flax' (an eqvae-jax weights directory) or 'taming' (a checkpoint file)."""
    if os.path.isdir(src):
        if os.path.isfile(os.path.join(src, weights.CONFIG_FILE)):
            return "flax"
        raise ValueError(f"{src}: a directory without {weights.CONFIG_FILE} is not an eqvae-jax weights "
                         f"directory; a taming checkpoint is a file (e.g. {CKPT_NAME}).")
    if os.path.isfile(src):
        if src.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            return "taming"
        raise ValueError(f"{src}: unknown weights file format; a taming checkpoint must end with one of "
                         f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}.")
    raise FileNotFoundError(f"{src} does not exist.")


# ---------------------------------------------------------------------------------------------- writing


def write_taming(dst: str, cfg: VQVAEConfig, flat: Mapping[str, np.ndarray], overwrite: bool = False) -> str:
    """Write a taming checkpoint (file) or a {last.ckpt, model.yaml} directory; returns what was written.

    Needs no torch: `.ckpt`/`.pt`/`.pth` files are written by `torch_files.write_torch_checkpoint`."""
    state_dict = flax_to_torch(flat, cfg)
    config = config_to_taming_yaml(cfg)  # validates before anything is written
    with atomic_path(dst, overwrite) as tmp:
        note = {CONFIG_NOTE: json.dumps(cfg.to_dict())}  # the resolution is not in the shapes; taming ignores it
        if dst.endswith(SAFETENSORS_SUFFIXES):
            write_safetensors(tmp, state_dict, note)
            return "safetensors state dict"
        if dst.endswith(PICKLE_SUFFIXES):
            write_torch_checkpoint(tmp, state_dict, extra=note)
            return "{'state_dict': ...} checkpoint"
        os.makedirs(tmp)
        write_torch_checkpoint(os.path.join(tmp, CKPT_NAME), state_dict)
        with open(os.path.join(tmp, YAML_NAME), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return f"{CKPT_NAME} + {YAML_NAME}"


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: Any) -> str:
    """Convert between a taming VQModel checkpoint and a Flax weights directory; returns a one-line summary."""
    check_target(vq_vae.KIND, to, TARGETS)
    options = typed_options(vq_vae.KIND, options, OPTIONS)
    fmt = detect_format(src)
    check_destination(dst, overwrite)
    notes = []
    if to == "flax":
        if fmt == "flax":
            raise ValueError(f"{src} is already an eqvae-jax weights directory; use --to taming.")
        got = read_taming(src, **options)
        cfg, flat = got.config, got.flat
        notes.append(f"architecture from {got.source}")
        if got.skipped:
            notes.append(f"skipped {len(got.skipped)} loss keys: {describe_skipped(got.skipped)} "
                         "(the discriminator converts with --kind discriminator)")
        if got.ignored:
            notes.append(f"ignored {got.ignored} keys outside {PREFIX}*")
        with atomic_path(dst, overwrite) as tmp:
            weights.save_weights(tmp, vq_vae.KIND, cfg.to_dict(), flat)
        written = "weights directory"
    else:
        if fmt != "flax":
            raise ValueError(f"--to {to} needs an eqvae-jax weights directory as --src; {src} is a {fmt} file.")
        if options:
            raise UsageError(f"--extra options {sorted(options)} only apply to a taming source.")
        cfg, flat = _read_flax(src)
        written = write_taming(dst, cfg, flat, overwrite)
        if (cfg.beta, cfg.legacy) != (0.25, True):
            notes.append(f"beta={cfg.beta}, legacy={cfg.legacy} are not in taming's config (it hard-codes 0.25, "
                         "legacy): the weights are unaffected")
    n_params = sum(int(np.prod(np.shape(v))) for v in flat.values())
    notes.append(f"config {json.dumps(cfg.to_dict(), separators=(',', ':'))}")
    head = (f"vq_vae: {fmt} {src} -> {to} {dst} ({written}, {len(flat)} tensors, {n_params / 1e6:.3f}M params, "
            f"{cfg.n_embed} codes)")
    return "; ".join([head, *notes])
