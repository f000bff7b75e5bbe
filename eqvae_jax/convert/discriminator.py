"""PatchGAN discriminator <-> taming/LDM layout: `--kind discriminator --src SRC --dst DST [--to taming]`.

`--to flax` (default): SRC is a bare `NLayerDiscriminator` state dict (`main.{i}.*`) or an LDM checkpoint,
where the discriminator sits at `loss.discriminator.main.{i}.*` among the autoencoder's keys (those are
reported and skipped). `num_batches_tracked` buffers are dropped (with a fixed momentum they never affect a
forward pass). `--to taming`: SRC is a weights directory; DST a safetensors file with bare `main.{i}.*` keys
that `NLayerDiscriminator.load_state_dict(strict=True)` accepts (`num_batches_tracked` written as 0).
`--extra input_nc=/ndf=/n_layers=` override the architecture (read from the conv shapes), `stats_groups=` the
stored BN mode.

Torch index of each layer (taming's `main` is one nn.Sequential): conv0 = main.0; for layer n = 1..n_layers
conv = main.{3n-1}, BatchNorm = main.{3n}; the last conv = main.{3 n_layers + 2}.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, Row, describe_skipped
from eqvae_jax.convert.options import check_destination, check_target, typed_options
from eqvae_jax.convert.torch_files import read_state_dict, write_safetensors
from eqvae_jax.models import discriminator as disc_model
from eqvae_jax.models.weights import assign_variables, flat_variables, save_weights, variable_shapes

TARGETS = ("flax", "taming")
OPTIONS = {"input_nc": int, "ndf": int, "n_layers": int, "stats_groups": int}
DEFAULTS = {"input_nc": 3, "ndf": 64, "n_layers": 3, "stats_groups": 1}
LDM_PREFIX = "loss.discriminator."
BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def key_map(n_layers: int = 3, prefix: str = "") -> KeyMap:
    """The rows of a discriminator with `n_layers` (PyTorch keys under `prefix`)."""
    conv_index = [0] + [3 * n - 1 for n in range(1, n_layers + 1)] + [3 * n_layers + 2]
    rows = []
    for i, t in enumerate(conv_index):
        rows.append(Row(f"convs/{i}/kernel", f"{prefix}main.{t}.weight", "conv"))
        if i in (0, len(conv_index) - 1):
            rows.append(Row(f"convs/{i}/bias", f"{prefix}main.{t}.bias"))
    for n in range(1, n_layers + 1):
        for ours, theirs in BN_NAMES.items():
            rows.append(Row(f"norms/{n - 1}/{ours}", f"{prefix}main.{3 * n}.{theirs}"))
    return KeyMap(rows)


def _config(options: Mapping[str, str | int]) -> dict[str, int]:
    return {**DEFAULTS, **typed_options(disc_model.KIND, options, OPTIONS)}


def model_shapes(config: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """{Flax key: shape} of the discriminator of `config`."""
    return variable_shapes(disc_model.abstract(config))


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
    return key_map(config["n_layers"], prefix).to_flax(own, model_shapes(config), what), skipped


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
    model = disc_model.abstract(cfg)
    assign_variables(model, flat, what="LDM checkpoint discriminator")
    return model


def infer_architecture(sd: Mapping[str, np.ndarray]) -> dict[str, int]:
    """input_nc, ndf and n_layers from the conv weight shapes of a bare or LDM-checkpoint state dict ({} when
    it has no first conv): an export with a non-default architecture converts back without --extra."""
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in sd) else ""
    first = sd.get(f"{prefix}main.0.weight")
    if first is None or np.ndim(first) != 4:
        return {}
    convs = [k for k, v in sd.items()
             if k.startswith(f"{prefix}main.") and k.endswith(".weight") and np.ndim(v) == 4]
    return {"input_nc": int(first.shape[1]), "ndf": int(first.shape[0]), "n_layers": len(convs) - 2}


def torch_state_dict(flat: Mapping[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """Flat Flax variables -> a bare taming `NLayerDiscriminator` state dict (numpy)."""
    out = key_map(n_layers).to_torch(flat)
    for n in range(1, n_layers + 1):
        out[f"main.{3 * n}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: str) -> str:
    """Convert between a taming/LDM PyTorch file and a Flax weights directory; returns a one-line summary."""
    check_target(disc_model.KIND, to, TARGETS)
    check_destination(dst, overwrite)
    if to == "flax":
        sd = read_state_dict(src)
        config = _config({**infer_architecture(sd), **options})
        flat, skipped = flax_variables(sd, config, what=src)
        with atomic_path(dst, overwrite) as tmp:
            save_weights(tmp, disc_model.KIND, config, flat)
        note = f" (skipped {len(skipped)} keys: {describe_skipped(skipped, grouped=False, limit=5)})" if skipped else ""
        return f"discriminator: wrote {len(flat)} arrays to {dst}{note}"
    _config(options)  # checks the options
    model = disc_model.load(src)
    sd = torch_state_dict(flat_variables(model), model.n_layers)
    with atomic_path(dst, overwrite) as tmp:
        write_safetensors(tmp, sd)
    return f"discriminator: wrote {len(sd)} taming tensors to {dst}"
