"""MaskGIT training pieces: the masking schedules' statistics, label drop, smoothed cross-entropy against
torch and optax, loss on all vs masked tokens, and the whole training forward on a tiny model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from maskgit_reference import get_mask_code

from eqvae_jax.maskgit import loss as mloss
from eqvae_jax.maskgit import masking
from eqvae_jax.models import maskgit


def test_mask_probability_matches_v1_formulas():
    r = np.linspace(0.0, 1.0, 101, dtype=np.float32)
    rt = torch.from_numpy(r)
    want = {
        "arccos": torch.arccos(rt) / (math.pi * 0.5),
        "cosine": torch.cos(rt * math.pi * 0.5),
        "linear": rt,
        "square": rt**2,
    }
    for name, w in want.items():
        np.testing.assert_allclose(np.asarray(masking.mask_probability(r, name)), w.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="unknown masking schedule"):
        masking.mask_probability(r, "halton")


@pytest.mark.parametrize("schedule", masking.SCHEDULES)
def test_masking_statistics_follow_the_schedule(schedule):
    """Empirical mask fraction (mean, and second moment of the per-image fraction) vs the analytic values.

    Per image the masked count is Binomial(N, p) with p = schedule(r): E[frac] = E[p] and
    E[frac^2] = E[p^2] + (E[p] - E[p^2]) / N. 4096 images of 256 tokens: standard errors ~ 0.005.
    """
    n_img, n_tok = 4096, 256
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (n_img, 16, 16)), jnp.int32)
    masked, mask = jax.jit(lambda k: masking.mask_tokens(k, tokens, 1024, schedule))(jax.random.key(0))
    masked, mask = np.asarray(masked), np.asarray(mask)
    assert mask.shape == (n_img, 16, 16)
    np.testing.assert_array_equal(masked[mask], 1024)
    np.testing.assert_array_equal(masked[~mask], np.asarray(tokens)[~mask])
    frac = mask.reshape(n_img, -1).mean(axis=1)
    m1, m2 = masking.EXPECTED_RATIO[schedule], masking.EXPECTED_RATIO_SQUARED[schedule]
    assert abs(frac.mean() - m1) < 0.02, (frac.mean(), m1)
    assert abs((frac**2).mean() - (m2 + (m1 - m2) / n_tok)) < 0.02
    # the same statistics from v1's own function (torch RNG), as a check of the analytic values
    torch.manual_seed(0)
    _, ref_mask = get_mask_code(torch.zeros(n_img, 16, 16, dtype=torch.long), mode=schedule, value=1024)
    ref_frac = ref_mask.reshape(n_img, -1).float().mean(1).numpy()
    assert abs(ref_frac.mean() - m1) < 0.02 and abs((ref_frac**2).mean() - (m2 + (m1 - m2) / n_tok)) < 0.02


def test_arccos_and_cosine_differ_in_distribution_not_mean():
    key = jax.random.key(1)
    r = jax.random.uniform(key, (200_000,))
    a, c = np.asarray(masking.mask_probability(r, "arccos")), np.asarray(masking.mask_probability(r, "cosine"))
    assert abs(a.mean() - c.mean()) < 0.005
    assert abs((a**2).mean() - 4 * (math.pi - 2) / math.pi**2) < 0.003 and abs((c**2).mean() - 0.5) < 0.003


def test_label_drop_rate():
    drop = np.asarray(masking.drop_labels(jax.random.key(3), 20_000, 0.1))
    assert drop.dtype == bool and abs(drop.mean() - 0.1) < 0.01
    assert not np.asarray(masking.drop_labels(jax.random.key(3), 100, 0.0)).any()


def test_smoothed_cross_entropy_matches_torch_and_optax():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 1025, (4, 256))
    logits = (rng.standard_normal((4, 256, 1025)) * 3 + 12 * np.eye(1025)[targets]).astype(np.float32)
    want = F.cross_entropy(torch.from_numpy(logits).reshape(-1, 1025), torch.from_numpy(targets).reshape(-1),
                           label_smoothing=0.1).item()
    got = float(mloss.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), 0.1))
    assert abs(got - want) < 1e-5 * abs(want), (got, want)
    smooth = optax.smooth_labels(jax.nn.one_hot(targets, 1025), 0.1)
    via_optax = float(optax.softmax_cross_entropy(jnp.asarray(logits), smooth).mean())
    assert abs(got - via_optax) < 1e-5 * abs(want)
    plain = F.cross_entropy(torch.from_numpy(logits).reshape(-1, 1025), torch.from_numpy(targets).reshape(-1)).item()
    assert abs(float(mloss.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), 0.0)) - plain) < 1e-5 * plain
    assert abs(plain - want) > 0.5  # smoothing matters for confident logits


def test_loss_on_masked_tokens_only():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 16, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, (2, 16)))
    mask = jnp.asarray(rng.random((2, 16)) < 0.4)
    per_token = np.asarray(mloss.token_cross_entropy(logits, targets, 0.1))
    np.testing.assert_allclose(float(mloss.cross_entropy(logits, targets, 0.1)), per_token.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(mloss.cross_entropy(logits, targets, 0.1, where=mask)),
                               per_token[np.asarray(mask)].mean(), rtol=1e-6)
    assert float(mloss.cross_entropy(logits, targets, 0.1, where=jnp.zeros_like(mask))) == 0.0
    hits = np.asarray(jnp.argmax(logits, -1) == targets)
    np.testing.assert_allclose(float(mloss.accuracy(logits, targets, mask)), hits[np.asarray(mask)].mean())


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="schedule"):
        mloss.Objective(schedule="halton")
    with pytest.raises(ValueError, match="loss_on"):
        mloss.Objective(loss_on="unmasked")


def test_training_loss_on_a_tiny_model():
    cfg = maskgit.MaskGITConfig(hidden_dim=32, depth=1, heads=2, mlp_dim=64, codebook_size=16, grid_size=4,
                                num_classes=5)
    fn, params = maskgit.functional(maskgit.build(cfg, seed=0))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 16, (8, 4, 4)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)

    key = jax.random.key(0)

    @jax.jit
    def run(p):
        model = lambda *a, **k: fn.apply(p, *a, **k)
        all_tokens = jax.value_and_grad(
            lambda q: mloss.training_loss(lambda *a, **k: fn.apply(q, *a, **k), tokens, labels, key, cfg.mask_id),
            has_aux=True)(p)
        masked_only = mloss.training_loss(model, tokens, labels, key, cfg.mask_id, mloss.Objective(loss_on="masked"))
        # the same pieces by hand: mask, drop, dropout keys as documented
        k_mask, k_drop, k_dropout = jax.random.split(key, 3)
        masked, _ = masking.mask_tokens(k_mask, tokens.reshape(8, -1), cfg.mask_id)
        drop = masking.drop_labels(k_drop, 8, 0.1)
        logits = fn.apply(p, masked, labels, drop, dropout_key=k_dropout)
        return all_tokens, masked_only, mloss.cross_entropy(logits, tokens.reshape(8, -1), 0.1)

    ((loss_all, m_all), grads), (loss_masked, m_masked), by_hand = run(params)
    assert np.isfinite(float(loss_all)) and float(loss_all) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(m_all["loss"]) == float(loss_all)
    assert 0.0 < float(m_all["mask_ratio"]) < 1.0 and 0.0 <= float(m_all["accuracy"]) <= 1.0
    assert float(m_masked["mask_ratio"]) == float(m_all["mask_ratio"])  # same key, same mask
    assert abs(float(loss_masked) - float(loss_all)) > 1e-4
    np.testing.assert_allclose(float(by_hand), float(loss_all), rtol=1e-5)
