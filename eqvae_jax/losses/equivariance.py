"""EQ-VAE's transform-and-compare (zelaki/eqvae `AutoencoderKL.training_step`), split for `jax.jit`.

Each optimizer call draws one transform on the host, shared by the whole batch (the reference's training_step):
  p_equivariance (0.5): scale s = k/32 (k in 8..31) and rot90 by 1..3 quarter turns, applied to the posterior
      *sample* and, identically (resize, then rotate), to the target image;
  else, with p_lowres (0.25, i.e. 0.125 overall): the image is downscaled by s and reconstructed as is;
  else (0.375): plain reconstruction.
The KL is always that of the encoder's actual input. There is no extra loss term: the usual objective is applied
to the (transformed target, reconstruction) pair.

Host side: `TransformSampler(cfg, seed).draw()` -> `Draw`; `draw.plan(image_hw)` -> (`BranchPlan`, rot_k).
`BranchPlan` is the static part (branch, scale numerators, rotation parity when the shape depends on it): one
compiled program per plan. rot_k (int32 in 0..3) is traced and applied with `lax.switch`.
Device side (inside any jit): `reconstruct_transformed` and `transformed_generator_loss` (KL-VAE);
`reconstruct_transformed_vq` and `transformed_vq_generator_loss` (VQ-VAE).

EQ-VQGAN (EQ-VAE paper §3.3: "apply the transformations on the latent features E(x) before the quantization")
transforms the VQ model's pre-quantization features, then quantizes the transformed features and decodes. Taken
after quant_conv here; before it would be the same, since a 1x1 conv acts on each position alone and so commutes
with rot90 and with bilinear resizing (both mix positions with weights shared across channels). The codebook
loss is that of the transformed features (what is quantized). Both autoencoders go through one
`encode_transformed`: the branch logic only needs the `LatentAutoencoder` protocol.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from eqvae_jax.losses import resample
from eqvae_jax.losses.autoencoder import LossConfig, LpipsFn, decode_with_last_layer, generator_loss
from eqvae_jax.losses.reconstruction import Posterior
from eqvae_jax.losses.vq import VQLossConfig, vq_generator_loss
from eqvae_jax.models.vq_vae import code_counts, codebook_usage, perplexity


class Branch(enum.StrEnum):
    EQUIVARIANCE = "equivariance"
    LOWRES = "lowres"
    PLAIN = "plain"


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """What the sampler may draw; defaults are the reference's (eqvae_config.yaml + training_step).

    p_lowres is conditional on not drawing the equivariance branch (the reference's p_prior_s), so the
    marginals are p_equivariance, (1 - p_equivariance) * p_lowres and the rest. Scales are
    scale_numerators[i] / scale_denominator. `anisotropic` draws H and W scales independently in the
    equivariance branch only (the reference's low-res branch is always isotropic).
    """

    p_equivariance: float = 0.5  # scale + rotate the latent and the target
    p_lowres: float = 0.25  # of the rest: reconstruct a downscaled image (0.125 overall)
    scale_numerators: tuple[int, ...] = tuple(range(8, 32))  # s = k/32, k = 8..31
    scale_denominator: int = 32
    rotations: tuple[int, ...] = (1, 2, 3)  # quarter turns, never 0
    anisotropic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_numerators", tuple(int(k) for k in self.scale_numerators))
        object.__setattr__(self, "rotations", tuple(int(k) for k in self.rotations))
        for name in ("p_equivariance", "p_lowres"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TransformConfig.{name} must be in [0, 1], got {getattr(self, name)}.")
        if not self.scale_numerators or any(k < 1 for k in self.scale_numerators) or self.scale_denominator < 1:
            raise ValueError("TransformConfig: scales must be positive fractions num/den.")
        if not self.rotations or any(k not in (0, 1, 2, 3) for k in self.rotations):
            raise ValueError(f"TransformConfig.rotations must be quarter turns in 0..3, got {self.rotations}.")

    def marginals(self) -> dict[Branch, float]:
        """Probability of each branch per draw."""
        rest = 1.0 - self.p_equivariance
        return {
            Branch.EQUIVARIANCE: self.p_equivariance,
            Branch.LOWRES: rest * self.p_lowres,
            Branch.PLAIN: rest * (1.0 - self.p_lowres),
        }


@dataclasses.dataclass(frozen=True)
class BranchPlan:
    """The static part of a draw: one compiled program each. Hashable, use as a static jit argument.

    scale = (num_h, num_w) over `denominator` (1/1 for the plain branch). rot_parity is None when every rotation
    keeps the transformed shape (square), else the parity (0/1) that the traced rotation k must have.
    """

    branch: Branch
    scale: tuple[int, int] = (1, 1)
    denominator: int = 1
    rot_parity: int | None = None

    def image_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial shape of the target image (and of the reconstruction) for an input of `image_hw`."""
        h, w = (resample.resized_size(n, s, self.denominator) for n, s in zip(image_hw, self.scale, strict=True))
        return (w, h) if self.rot_parity == 1 else (h, w)

    def __str__(self) -> str:
        s = f"{self.scale[0]}/{self.denominator}"
        s += "" if self.scale[0] == self.scale[1] else f"x{self.scale[1]}/{self.denominator}"
        return f"{self.branch.value}@{s}" + ("" if self.rot_parity is None else f",parity{self.rot_parity}")


@dataclasses.dataclass(frozen=True)
class Draw:
    """One host-side draw: branch, scale numerators (h, w) over the config's denominator, quarter turns."""

    branch: Branch
    scale: tuple[int, int]
    denominator: int
    rot_k: int = 0

    def plan(self, image_hw: tuple[int, int]) -> tuple[BranchPlan, np.int32]:
        """(static plan, traced-to-be rotation) for a batch of `image_hw` images."""
        if self.branch is Branch.PLAIN:
            return BranchPlan(Branch.PLAIN), np.int32(0)
        if self.branch is Branch.LOWRES:
            return BranchPlan(Branch.LOWRES, self.scale, self.denominator), np.int32(0)
        h, w = (resample.resized_size(n, s, self.denominator) for n, s in zip(image_hw, self.scale, strict=True))
        parity = None if h == w else self.rot_k % 2
        return BranchPlan(Branch.EQUIVARIANCE, self.scale, self.denominator, parity), np.int32(self.rot_k % 4)


def all_plans(cfg: TransformConfig, image_hw: tuple[int, int]) -> list[BranchPlan]:
    """Every static plan the sampler can produce for `image_hw` inputs: the bound on compiled variants."""
    den, nums = cfg.scale_denominator, cfg.scale_numerators
    plans: set[BranchPlan] = set()
    p = cfg.marginals()
    if p[Branch.EQUIVARIANCE] > 0:
        pairs = [(a, b) for a in nums for b in nums] if cfg.anisotropic else [(a, a) for a in nums]
        for pair in pairs:
            for k in cfg.rotations:
                plans.add(Draw(Branch.EQUIVARIANCE, pair, den, k).plan(image_hw)[0])
    if p[Branch.LOWRES] > 0:
        plans.update(BranchPlan(Branch.LOWRES, (a, a), den) for a in nums)
    if p[Branch.PLAIN] > 0:
        plans.add(BranchPlan(Branch.PLAIN))
    order = {b: i for i, b in enumerate(Branch)}
    return sorted(plans, key=lambda q: (order[q.branch], q.scale, -1 if q.rot_parity is None else q.rot_parity))


class TransformSampler:
    """Seeded host-side sampler (numpy PCG64) with the reference's draw order; its state is checkpointable.

    Per draw: u ~ U[0,1); if u < p_equivariance: scale (H, then W if anisotropic) and rotation; else
    v ~ U[0,1); if v < p_lowres: one scale; else plain. Draw once per optimizer call (G and D separately).
    """

    def __init__(self, cfg: TransformConfig, seed: int = 0):
        self.cfg = cfg
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def _scale(self) -> int:
        return self.cfg.scale_numerators[int(self._rng.integers(len(self.cfg.scale_numerators)))]

    def draw(self) -> Draw:
        cfg = self.cfg
        if self._rng.random() < cfg.p_equivariance:
            sh = self._scale()
            sw = self._scale() if cfg.anisotropic else sh
            k = cfg.rotations[int(self._rng.integers(len(cfg.rotations)))]
            return Draw(Branch.EQUIVARIANCE, (sh, sw), cfg.scale_denominator, k)
        if self._rng.random() < cfg.p_lowres:
            s = self._scale()
            return Draw(Branch.LOWRES, (s, s), cfg.scale_denominator)
        return Draw(Branch.PLAIN, (cfg.scale_denominator,) * 2, cfg.scale_denominator)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable generator state (128-bit integers as decimal strings, exact in any JSON reader)."""
        s = self._rng.bit_generator.state
        return {
            "bit_generator": s["bit_generator"],
            "state": str(s["state"]["state"]),
            "inc": str(s["state"]["inc"]),
            "has_uint32": int(s["has_uint32"]),
            "uinteger": int(s["uinteger"]),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a `state()`; the following draws repeat those made after it was taken."""
        if state.get("bit_generator") != "PCG64":
            raise ValueError(f"TransformSampler state must be PCG64, got {state.get('bit_generator')!r}.")
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state["has_uint32"]),
            "uinteger": int(state["uinteger"]),
        }


def transform_pair(
    latent: jax.Array, image: jax.Array, plan: BranchPlan, rot_k: jax.Array | int
) -> tuple[jax.Array, jax.Array]:
    """The equivariance transform (resize, then rotate) applied identically to a latent and an image."""
    out = []
    for a in (latent, image):
        a = resample.resize(a, plan.scale, plan.denominator)
        out.append(resample.rot90_traced(a, rot_k, plan.rot_parity))
    return out[0], out[1]


class LatentAutoencoder(Protocol):
    """What the EQ transform needs from an autoencoder (`KLVAE`, `VQVAE`): the latent it acts on, and a decoder.

    `transformable_latent(x, key)` -> (latent, encoded): the KL-VAE's posterior sample (key) and its posterior
    (for the KL term); the VQ-VAE's pre-quantization features and None. What `decode` takes is the latent
    itself (KL) or its quantization (VQ, `vq.quantize(latent).quantized`).
    """

    def transformable_latent(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, Any]: ...

    def decode(self, z: jax.Array) -> jax.Array: ...


def _transformable_latent(vae: nnx.Module, x: jax.Array, key: jax.Array | None) -> tuple[jax.Array, Any]:
    if hasattr(vae, "transformable_latent"):
        return vae.transformable_latent(x, key)
    posterior = vae.encode(x)  # a KL autoencoder without the method (e.g. a test model): encode -> posterior
    return posterior.sample(key), posterior


def encode_transformed(
    vae: LatentAutoencoder, x: jax.Array, plan: BranchPlan, rot_k: jax.Array | int, key: jax.Array | None
) -> tuple[jax.Array, jax.Array, Any]:
    """(target, transformed latent, encoder output) for one branch; `x` NHWC in [-1, 1].

    For the KL-VAE the latent is a posterior sample drawn with `key` and the encoder output is the posterior of
    the encoder's input; for the VQ-VAE (key unused) the pre-quantization features and None.
    """
    if plan.branch is Branch.LOWRES:
        x = resample.resize(x, plan.scale, plan.denominator)
    z, encoded = _transformable_latent(vae, x, key)
    if plan.branch is Branch.EQUIVARIANCE:
        z, x = transform_pair(z, x, plan, rot_k)
    return x, z, encoded


def reconstruct_transformed(
    vae: nnx.Module, x: jax.Array, plan: BranchPlan, rot_k: jax.Array | int, key: jax.Array
) -> tuple[jax.Array, jax.Array, Posterior]:
    """(target, reconstruction, posterior): the reference's forward for one branch, usable inside any jit."""
    target, z, posterior = encode_transformed(vae, x, plan, rot_k, key)
    return target, vae.decode(z), posterior


def transformed_generator_loss(
    vae: nnx.Module,
    lpips: LpipsFn,
    disc: nnx.Module,
    x: jax.Array,
    plan: BranchPlan,
    rot_k: jax.Array | int,
    key: jax.Array,
    step: jax.Array | int,
    cfg: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
    """(total, terms, (target, reconstruction)): the generator objective of one branch.

    `key` is split into the posterior-sample key and (if cfg.lpips_dropout) the LPIPS dropout key. Differentiate
    `total` w.r.t. the VAE parameters; D's BatchStat is updated in place (train-mode call on the fake batch).
    """
    sample_key, lpips_key = jax.random.split(key)
    target, z, posterior = encode_transformed(vae, x, plan, rot_k, sample_key)
    recon, last_layer_vjp = decode_with_last_layer(vae, z, cfg.last_layer)
    total, terms = generator_loss(
        target, recon, last_layer_vjp, posterior, lpips, disc, step, cfg, lpips_key if cfg.lpips_dropout else None
    )
    return total, terms, (target, recon)


def reconstruct_transformed_vq(
    vq: nnx.Module, x: jax.Array, plan: BranchPlan, rot_k: jax.Array | int
) -> tuple[jax.Array, jax.Array, Any]:
    """(target, reconstruction, `VQEncoding` of the transformed features): EQ-VQGAN's forward for one branch
    (encode, transform the pre-quantization features, quantize, decode); deterministic, usable inside any jit."""
    target, latents, _ = encode_transformed(vq, x, plan, rot_k, None)
    encoding = vq.quantize(latents)
    return target, vq.decode(encoding.quantized), encoding


def transformed_vq_generator_loss(
    vq: nnx.Module,
    lpips: LpipsFn,
    disc: nnx.Module,
    x: jax.Array,
    plan: BranchPlan,
    rot_k: jax.Array | int,
    key: jax.Array,
    step: jax.Array | int,
    cfg: VQLossConfig,
) -> tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
    """(total, terms, (target, reconstruction)): the VQGAN generator objective (`losses.vq`) of one branch.

    `key` is split like `transformed_generator_loss`'s; only its second half is used (the LPIPS dropout key, if
    cfg.lpips_dropout). terms add `codebook_usage` and `perplexity` of this batch's code indices and their
    `code_counts` ((n_embed,) int32; sum them over steps for figures of many batches, see `models.vq_vae`).
    Differentiate `total` w.r.t.
    the VQ model's parameters (the codebook included); D's BatchStat is updated in place.
    """
    _, lpips_key = jax.random.split(key)
    target, latents, _ = encode_transformed(vq, x, plan, rot_k, None)
    encoding = vq.quantize(latents)
    recon, last_layer_vjp = decode_with_last_layer(vq, encoding.quantized, cfg.last_layer)
    total, terms = vq_generator_loss(target, recon, last_layer_vjp, encoding.codebook_loss, lpips, disc, step, cfg,
                                     lpips_key if cfg.lpips_dropout else None)
    counts = code_counts(encoding.indices, vq.quantize.n_embed)
    terms.update(codebook_usage=codebook_usage(counts), perplexity=perplexity(counts), code_counts=counts)
    return total, terms, (target, recon)


def plans_summary(plans: Sequence[BranchPlan]) -> dict[str, int]:
    """Number of plans per branch, for the startup log line."""
    out = {b.value: 0 for b in Branch}
    for p in plans:
        out[p.branch.value] += 1
    return out
