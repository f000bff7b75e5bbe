"""Which autoencoder a job uses, as typed arguments: one way to build it for every job and CLI.

    spec = AutoencoderSpec(init="weights", weights="weights/eq_vae")      # a converted weights dir
    spec = AutoencoderSpec(init="random", preset="tiny", seed=0)          # tests and demos
    vae = build_autoencoder(spec)

The spec is JSON-serialisable (`dataclasses.asdict`); the latent cache stores it so that sampling decodes with
the same autoencoder that encoded. `scaling_factor` / `shift_factor` override the model's latent
normalisation (0 / None = the model's own: 0.18215 and 0 for SD-VAE and EQ-VAE).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from eqvae_jax.models import kl_vae, weights

INITS = ("weights", "random")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AutoencoderSpec:
    init: str = "weights"  # 'weights' (python -m eqvae_jax.convert --kind kl_vae) or 'random'
    weights: str = ""
    preset: str = "sd_vae"  # init='random': a kl_vae preset name
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # init='random': KLVAEConfig fields
    dtype: str = "float32"  # compute dtype (parameters stay float32)
    seed: int = 0  # init='random'
    scaling_factor: float = 0.0
    shift_factor: float | None = None

    def problems(self, name: str) -> list[str]:
        """What is wrong with this spec, naming the config section `name` (empty when nothing)."""
        if self.init == "weights":
            if not self.weights:
                return [f"{name}.weights is empty: give a converted Flax weights dir (python -m eqvae_jax.convert)"]
            try:
                kind, _ = weights.read_config(self.weights)
            except (FileNotFoundError, ValueError) as e:
                return [f"{name}.weights: {e}"]
            return [] if kind == kl_vae.KIND else [f"{name}.weights holds a {kind!r} model, not {kl_vae.KIND!r}"]
        if self.init != "random":
            return [f"{name}.init must be one of {INITS}, not {self.init!r}"]
        if self.preset not in kl_vae.PRESETS:
            return [f"{name}.preset {self.preset!r} is not one of {sorted(kl_vae.PRESETS)}"]
        try:
            self.model_config()
        except (TypeError, ValueError) as e:
            return [f"{name}.overrides: {e}"]
        return []

    def model_config(self) -> kl_vae.KLVAEConfig:
        """The architecture (read from the weights dir's config.json; no weights are loaded)."""
        if self.init == "weights":
            cfg = kl_vae.KLVAEConfig.from_dict(weights.read_config(self.weights)[1])
            cfg = dataclasses.replace(cfg, dtype=self.dtype)
        else:
            cfg = kl_vae.PRESETS[self.preset](**{**self.overrides, "dtype": self.dtype})
        return self._normalisation(cfg)

    def _normalisation(self, cfg: kl_vae.KLVAEConfig) -> kl_vae.KLVAEConfig:
        changes: dict[str, float] = {}
        if self.scaling_factor > 0:
            changes["scaling_factor"] = float(self.scaling_factor)
        if self.shift_factor is not None:
            changes["shift_factor"] = float(self.shift_factor)
        return dataclasses.replace(cfg, **changes) if changes else cfg


def build_autoencoder(spec: AutoencoderSpec) -> kl_vae.KLVAE:
    """The KLVAE a spec describes (weights loaded, or random with PyTorch's init drawn on the host)."""
    if spec.init == "weights":
        vae = kl_vae.load(spec.weights, dtype=spec.dtype)
        vae.config = spec._normalisation(vae.config)
        log.info("autoencoder: loaded %s", spec.weights)
        return vae
    log.info("autoencoder: random %s (seed %d)", spec.preset, spec.seed)
    return kl_vae.build(spec.model_config(), seed=spec.seed)
