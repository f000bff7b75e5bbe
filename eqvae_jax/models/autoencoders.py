"""Which autoencoder a job uses, as typed arguments: one way to build it for every job and CLI.

    spec = AutoencoderSpec(init="weights", weights="weights/eq_vae")      # a converted weights dir
    spec = AutoencoderSpec(init="random", preset="tiny", seed=0)          # tests and demos
    spec = AutoencoderSpec(kind="vq_vae", weights="weights/vqgan")        # the taming VQGAN (MaskGIT's tokenizer)
    vae = build_autoencoder(spec)

`kind` is the model family: 'kl_vae' (SD-VAE and relatives, `models.kl_vae`) or 'vq_vae' (taming VQGAN,
`models.vq_vae`); a weights directory records its own kind, and a mismatch is an error naming both. The spec is
JSON-serialisable (`dataclasses.asdict`); the latent and token caches store it so that sampling decodes with the
same autoencoder that encoded. `scaling_factor` / `shift_factor` override a KL model's latent normalisation
(0 / None = the model's own: 0.18215 and 0 for SD-VAE and EQ-VAE); a VQ model has none.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from eqvae_jax.models import kl_vae, vq_vae, weights

INITS = ("weights", "random")
FAMILIES = {kl_vae.KIND: kl_vae, vq_vae.KIND: vq_vae}
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AutoencoderSpec:
    init: str = "weights"  # 'weights' (python -m eqvae_jax.convert --kind KIND) or 'random'
    weights: str = ""
    preset: str = "sd_vae"  # init='random': a preset name of the kind's module
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # init='random': config fields
    dtype: str = "float32"  # compute dtype (parameters stay float32)
    seed: int = 0  # init='random'
    scaling_factor: float = 0.0
    shift_factor: float | None = None
    kind: str = kl_vae.KIND  # 'kl_vae' or 'vq_vae'

    @property
    def module(self) -> Any:
        """The model family's module (`models.kl_vae` or `models.vq_vae`)."""
        return FAMILIES[self.kind]

    def problems(self, name: str) -> list[str]:
        """What is wrong with this spec, naming the config section `name` (empty when nothing)."""
        if self.kind not in FAMILIES:
            return [f"{name}.kind must be one of {sorted(FAMILIES)}, not {self.kind!r}"]
        if self.init == "weights":
            if not self.weights:
                return [f"{name}.weights is empty: give a converted Flax weights dir (python -m eqvae_jax.convert)"]
            try:
                kind, _ = weights.read_config(self.weights)
            except (FileNotFoundError, ValueError) as e:
                return [f"{name}.weights: {e}"]
            if kind != self.kind:
                return [f"{name}.weights holds a {kind!r} model, not {self.kind!r} ({name}.kind)"]
            return []
        if self.init != "random":
            return [f"{name}.init must be one of {INITS}, not {self.init!r}"]
        if self.preset not in self.module.PRESETS:
            return [f"{name}.preset {self.preset!r} is not a {self.kind} preset ({sorted(self.module.PRESETS)})"]
        try:
            self.model_config()
        except (TypeError, ValueError) as e:
            return [f"{name}.overrides: {e}"]
        return []

    def model_config(self) -> Any:
        """The architecture (`KLVAEConfig` or `VQVAEConfig`, read from the weights dir's config.json; no weights
        are loaded)."""
        config_cls = kl_vae.KLVAEConfig if self.kind == kl_vae.KIND else vq_vae.VQVAEConfig
        if self.init == "weights":
            cfg = dataclasses.replace(config_cls.from_dict(weights.read_config(self.weights)[1]), dtype=self.dtype)
        else:
            cfg = self.module.PRESETS[self.preset](**{**self.overrides, "dtype": self.dtype})
        return self._normalisation(cfg)

    def _normalisation(self, cfg: Any) -> Any:
        if self.kind != kl_vae.KIND:
            return cfg
        changes: dict[str, float] = {}
        if self.scaling_factor > 0:
            changes["scaling_factor"] = float(self.scaling_factor)
        if self.shift_factor is not None:
            changes["shift_factor"] = float(self.shift_factor)
        return dataclasses.replace(cfg, **changes) if changes else cfg


def build_autoencoder(spec: AutoencoderSpec) -> kl_vae.KLVAE | vq_vae.VQVAE:
    """The model a spec describes (weights loaded, or random with the reference's init drawn on the host)."""
    if spec.init == "weights":
        vae = spec.module.load(spec.weights, dtype=spec.dtype)
        vae.config = spec._normalisation(vae.config)
        log.info("autoencoder: loaded %s", spec.weights)
        return vae
    log.info("autoencoder: random %s %s (seed %d)", spec.kind, spec.preset, spec.seed)
    return spec.module.build(spec.model_config(), seed=spec.seed)
