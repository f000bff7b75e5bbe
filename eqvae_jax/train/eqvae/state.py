"""Train state of the EQ fine-tuning job (either autoencoder family) and its two optimizers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class EQVAEState:
    """Everything on device that a checkpoint must hold (host RNG and data state are saved beside it).

    `step` counts micro-steps; the optimizers apply an update every `accumulate` of them (optax.MultiSteps).
    """

    step: jax.Array
    vae: nnx.State  # autoencoder Params (encoder, decoder, quant convs; a VQGAN's codebook)
    disc: nnx.State  # discriminator Params
    disc_stats: nnx.State  # discriminator BatchNorm running statistics
    opt_g: Any
    opt_d: Any
    ema: Any  # EMA of `vae` (an nnx.State) or an empty dict when disabled


def adam(lr: float, b1: float, b2: float, eps: float, accumulate: int) -> optax.GradientTransformation:
    """The reference's Adam (no weight decay, constant LR), with optional gradient accumulation."""
    tx = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return optax.MultiSteps(tx, every_k_schedule=accumulate) if accumulate > 1 else tx


def create_state(
    vae_params: nnx.State,
    disc_params: nnx.State,
    disc_stats: nnx.State,
    tx_g: optax.GradientTransformation,
    tx_d: optax.GradientTransformation,
    ema: bool,
) -> EQVAEState:
    return EQVAEState(
        step=jnp.zeros((), jnp.int32),
        vae=vae_params,
        disc=disc_params,
        disc_stats=disc_stats,
        opt_g=tx_g.init(vae_params),
        opt_d=tx_d.init(disc_params),
        ema=jax.tree.map(jnp.copy, vae_params) if ema else {},
    )
