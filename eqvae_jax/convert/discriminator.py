"""PatchGAN discriminator <-> taming/LDM layout: `--kind discriminator --src SRC --dst DST [--to taming]`.

`--to flax` (default): SRC is a bare `NLayerDiscriminator` state dict (`main.{i}.*`) or an LDM checkpoint,
where the discriminator sits at `loss.discriminator.main.{i}.*` among the autoencoder's keys (those are
reported and skipped). `num_batches_tracked` buffers are dropped (with a fixed momentum they never affect a
forward pass). `--to taming`: SRC is a weights directory; DST a safetensors file with bare `main.{i}.*` keys
that `NLayerDiscriminator.load_state_dict(strict=True)` accepts (`num_batches_tracked` written as 0).
`--extra input_nc=/ndf=/n_layers=` set the architecture (default 3/64/3), `stats_groups=` the stored BN mode.

Torch index of each layer (taming's `main` is one nn.Sequential): conv0 = main.0; for layer n = 1..n_layers
conv = main.{3n-1}, BatchNorm = main.{3n}; the last conv = main.{3 n_layers + 2}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.torch_files import conv_to_flax, conv_to_torch, read_state_dict, write_safetensors
from eqvae_jax.models import discriminator as disc_model
from eqvae_jax.models.weights import assign_variables, check_shapes, flat_variables, path_key, save_weights

TARGETS = ("flax", "taming")
LDM_PREFIX = "loss.discriminator."
BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def key_map(n_layers: int = 3) -> dict[str, str]:
    """{flax key: torch key (without prefix)} for a discriminator with `n_layers`."""
    conv_index = [0] + [3 * n - 1 for n in range(1, n_layers + 1)] + [3 * n_layers + 2]
    out = {}
    for i, t in enumerate(conv_index):
        out[f"convs/{i}/kernel"] = f"main.{t}.weight"
        if i in (0, len(conv_index) - 1):
            out[f"convs/{i}/bias"] = f"main.{t}.bias"
    for n in range(1, n_layers + 1):
        for ours, theirs in BN_NAMES.items():
            out[f"norms/{n - 1}/{ours}"] = f"main.{3 * n}.{theirs}"
    return out


def _config(options: Mapping[str, str | int]) -> dict[str, int]:
    allowed = ("input_nc", "ndf", "n_layers", "stats_groups")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown discriminator option(s) {unknown}; allowed: {', '.join(allowed)}.")
    return {k: int(options.get(k, d)) for k, d in zip(allowed, (3, 64, 3, 1), strict=True)}


def torch_shapes(config: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """{torch key (no prefix): shape} the discriminator of `config` expects, from the model itself."""
    model = disc_model.abstract_discriminator(**config)
    kmap = key_map(config["n_layers"])
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = tuple(var.get_value().shape)
        out[kmap[path_key(path)]] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    return out


def flax_variables(sd: Mapping[str, np.ndarray], config: Mapping[str, int], what: str = "discriminator",
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """(flat Flax variables, skipped keys) from a bare or LDM-checkpoint state dict.

    Strict on the discriminator's own keys (KeyMismatchError names missing / unexpected / mis-shaped ones
    with their prefix in `sd`); in an LDM checkpoint every key outside `loss.discriminator.` is skipped.
    """
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in sd) else ""
    if not any(k.startswith(prefix + "main.") for k in sd):
        raise ValueError(f"{what}: no discriminator keys (neither main.* nor {LDM_PREFIX}main.*).")
    skipped = sorted(k for k in sd if not k.startswith(prefix))  # num_batches_tracked: dropped, expected
    own = {k: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith(".num_batches_tracked")}
    expected = {prefix + k: s for k, s in torch_shapes(config).items()}
    check_shapes(what, {k: np.shape(v) for k, v in own.items()}, expected)
    flat = {}
    for fkey, tkey in key_map(config["n_layers"]).items():
        w = np.asarray(own[prefix + tkey], np.float32)
        flat[fkey] = conv_to_flax(w) if w.ndim == 4 else w
    return flat, skipped


def discriminator_from_ldm_state_dict(
    sd: Mapping[str, np.ndarray], **config: int
) -> disc_model.NLayerDiscriminator | None:
    """The discriminator in an LDM checkpoint state dict; None when it has no `loss.discriminator.` keys.

    For warm-starting training (e.g. from kl-f8's model.ckpt via `read_state_dict`); `config`: input_nc,
    ndf, n_layers, stats_groups as for `NLayerDiscriminator`. Raises KeyMismatchError on a partial D.
    """
    if not any(k.startswith(LDM_PREFIX) for k in sd):
        return None
    cfg = _config(config)
    flat, _ = flax_variables(sd, cfg, what="LDM checkpoint discriminator")
    model = disc_model.abstract_discriminator(**cfg)
    assign_variables(model, flat, what="LDM checkpoint discriminator")
    return model


def torch_state_dict(flat: Mapping[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """Flat Flax variables -> a bare taming `NLayerDiscriminator` state dict (numpy)."""
    out = {}
    for fkey, tkey in key_map(n_layers).items():
        w = np.asarray(flat[fkey], np.float32)
        out[tkey] = conv_to_torch(w) if w.ndim == 4 else w
    for n in range(1, n_layers + 1):
        out[f"main.{3 * n}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _summary(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f" (skipped {len(keys)} keys: {shown})"


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: str) -> str:
    """Convert between a taming/LDM PyTorch file and a Flax weights directory; returns a one-line summary."""
    if to not in TARGETS:
        raise ValueError(f"--kind discriminator supports --to {', '.join(TARGETS)}, not {to!r}.")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    config = _config(options)
    if to == "flax":
        flat, skipped = flax_variables(read_state_dict(src), config, what=src)
        with atomic_path(dst, overwrite) as tmp:
            save_weights(tmp, disc_model.KIND, config, flat)
        return f"discriminator: wrote {len(flat)} arrays to {dst}{_summary(skipped)}"
    model = disc_model.load(src)
    sd = torch_state_dict(flat_variables(model), model.n_layers)
    with atomic_path(dst, overwrite) as tmp:
        write_safetensors(tmp, sd)
    return f"discriminator: wrote {len(sd)} taming tensors to {dst}"
