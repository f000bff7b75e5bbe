"""The MaskGIT training objective of valeoai/Maskgit-pytorch v1, as pure functions.

One v1 step on a batch of token grids: mask tokens with the schedule (`masking.mask_tokens`), drop 10% of the
labels, run the transformer with dropout, and take `nn.CrossEntropyLoss(label_smoothing=0.1)` of the logits
over the codes and the mask id (1025 classes) against the original tokens, averaged over ALL tokens, masked
or not. `loss_on="masked"` averages over the masked tokens only (Chang et al.'s objective).

Label smoothing as torch defines it: target = (1 - eps) one_hot(y) + eps / C over all C classes, so the
per-token loss is (1 - eps) (-log p_y) + eps * mean_c(-log p_c).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from eqvae_jax.maskgit.masking import SCHEDULES, drop_labels, mask_tokens

LOSS_ON = ("all", "masked")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The training-objective options; defaults are valeoai v1's."""

    schedule: str = "arccos"
    label_drop: float = 0.1
    label_smoothing: float = 0.1
    loss_on: str = "all"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Objective: schedule {self.schedule!r} not one of {', '.join(SCHEDULES)}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"Objective: loss_on {self.loss_on!r} not one of {', '.join(LOSS_ON)}")
        if not (0.0 <= self.label_drop <= 1.0 and 0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"Objective: label_drop {self.label_drop} / label_smoothing {self.label_smoothing}")


def token_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.1) -> jax.Array:
    """Per-token cross-entropy (float32) with torch's label smoothing; logits (..., C), targets (...) int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return values.mean()
    weights = weights.astype(jnp.float32)
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.1, where: jax.Array | None = None
) -> jax.Array:
    """Mean smoothed cross-entropy over all tokens, or over the tokens where `where` is True."""
    return _weighted_mean(token_cross_entropy(logits, targets, label_smoothing), where)


def accuracy(logits: jax.Array, targets: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Fraction of tokens whose argmax is the target (over all tokens, as v1 logs it, or where `where`)."""
    return _weighted_mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32), where)


def training_loss(
    model: Callable[..., jax.Array],
    tokens: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    mask_id: int,
    objective: Objective = Objective(),
) -> tuple[jax.Array, dict[str, Any]]:
    """(loss, metrics) of one v1 training forward pass on (B, N) or (B, g, g) int tokens and (B,) labels.

    `model(masked_tokens, labels, drop_label, dropout_key=...)` returns (B, N, codebook_size + 1) logits:
    a `models.maskgit.MaskGIT` (or a `functools.partial` of `FunctionalMaskGIT.apply` with its params).
    `key` is split into the masking, label-drop and dropout keys. Metrics: loss, accuracy (all tokens),
    masked_accuracy, mask_ratio.
    """
    b = tokens.shape[0]
    tokens = tokens.reshape(b, -1)
    k_mask, k_drop, k_dropout = jax.random.split(key, 3)
    masked, mask = mask_tokens(k_mask, tokens, mask_id, objective.schedule)
    drop = drop_labels(k_drop, b, objective.label_drop)
    logits = model(masked, labels, drop, dropout_key=k_dropout)
    where = mask if objective.loss_on == "masked" else None
    loss = cross_entropy(logits, tokens, objective.label_smoothing, where)
    metrics = {
        "loss": loss,
        "accuracy": accuracy(logits, tokens),
        "masked_accuracy": accuracy(logits, tokens, mask),
        "mask_ratio": mask.astype(jnp.float32).mean(),
    }
    return loss, metrics
