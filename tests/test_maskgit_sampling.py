"""MaskGIT decoding: v1's reveal schedule exactly, tokens revealed per step, revealed tokens fixed, the CFG
formula and its linear ramp, CFG 0 = unguided, and samples independent of the batch they ran in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from maskgit_reference import adap_sche

from eqvae_jax.maskgit import sampling
from eqvae_jax.models import maskgit

CFG = maskgit.MaskGITConfig(hidden_dim=32, depth=1, heads=2, mlp_dim=64, codebook_size=32, grid_size=8,
                            num_classes=10)
N = CFG.num_tokens  # 64


@pytest.fixture(scope="module")
def model():
    m = maskgit.build(CFG, seed=0)
    m.tok_emb.embedding.set_value(m.tok_emb.embedding[...] * 0.2)  # logits ~ +-5: sampling is not one-hot
    return m


@pytest.fixture(scope="module")
def guided(model):
    """One jitted guided decoder (w = 3) shared by the tests, so batch-4 calls compile once."""
    return make_decode(model, cfg_scale=3.0)


LABELS = jnp.asarray([3, 1, 4, 1])


def keys_for(indices, seed=0):
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices))


def make_decode(model, **kw):
    run = functools.partial(sampling.decode, num_tokens=N, codebook_size=CFG.codebook_size, **kw)
    return jax.jit(lambda labels, keys: run(lambda t, y, d: model(t, y, d), labels, keys))


def test_reveal_schedule_is_v1_adap_sche():
    for mode in sampling.REVEAL_SCHEDULES:
        for steps in range(2, 41):
            for n in (256, 64):
                want = adap_sche(steps, mode, n).tolist()
                if min(want) < 1:  # v1 would ask topk for a negative count
                    with pytest.raises(ValueError, match="at least one per step"):
                        sampling.reveal_schedule(steps, n, mode)
                    continue
                assert sampling.reveal_schedule(steps, n, mode) == tuple(want), (mode, steps, n)
    assert sampling.reveal_schedule(8) == (1, 18, 26, 32, 38, 43, 48, 50)
    with pytest.raises(ValueError, match="at least 2 steps"):
        sampling.reveal_schedule(1)
    with pytest.raises(ValueError, match="unknown reveal schedule"):
        sampling.reveal_schedule(8, mode="halton")


@pytest.mark.parametrize("randomize", ["linear", "warm_up"])
def test_tokens_revealed_per_step_follow_the_schedule_and_never_change(model, randomize):
    counts = sampling.reveal_schedule(8, N)
    decode = jax.jit(lambda labels, keys: sampling.decode(
        lambda t, y, d: model(t, y, d), labels, keys, num_tokens=N, codebook_size=CFG.codebook_size,
        randomize=randomize, trace=True))
    codes, trace = decode(jnp.arange(4) % 10, keys_for(range(4)))
    tokens, masked = np.asarray(trace.tokens), np.asarray(trace.masked)
    assert tokens.shape == masked.shape == (8, 4, N)
    revealed = (~masked).sum(-1)  # (steps, batch)
    np.testing.assert_array_equal(revealed, np.broadcast_to(np.cumsum(counts)[:, None], (8, 4)))
    np.testing.assert_array_equal(tokens[masked], CFG.mask_id)
    for s in range(1, 8):
        was = ~masked[s - 1]
        np.testing.assert_array_equal(tokens[s][was], tokens[s - 1][was])  # revealed tokens never change
        assert not (masked[s] & was).any()
    np.testing.assert_array_equal(np.asarray(codes), np.clip(tokens[-1], 0, CFG.codebook_size - 1))
    assert len(np.unique(np.asarray(codes))) > 8  # real sampling, not a constant


def test_cfg_scale_zero_equals_the_unguided_model(model, guided):
    labels, keys = LABELS, keys_for(range(4))
    unguided = make_decode(model, cfg_scale=0)(labels, keys)  # v1's w == 0 branch: one conditional pass
    both_passes = jax.jit(lambda labels, keys, w: sampling.decode(
        lambda t, y, d: model(t, y, d), labels, keys, num_tokens=N, codebook_size=CFG.codebook_size,
        cfg_scale=w))(labels, keys, jnp.float32(0.0))  # traced scale: guided arithmetic with w = 0
    np.testing.assert_array_equal(np.asarray(unguided), np.asarray(both_passes))
    assert (np.asarray(guided(labels, keys)) != np.asarray(unguided)).mean() > 0.02  # same keys: early steps agree


def test_guidance_formula_and_linear_ramp():
    """Conditional logits favour code 0 by 1, unconditional ones code 0 by 2 over code 1: the guided
    (1 + w) c - w u prefers code 0 while w < 1 and code 1 once w > 1. With w_i = 3 i / 7 the tokens revealed
    at steps 0-2 (w <= 0.86) are 0 and those of steps 3-7 (w >= 1.29) are 1; sharp softmax, no noise."""

    def logits_fn(tokens, labels, drop):
        b, n = tokens.shape
        base = jnp.full((b, n, 5), -30.0).at[:, :, 1].set(0.0)
        return base.at[:, :, 0].set(jnp.where(drop[:, None], 2.0, 1.0))

    run = jax.jit(lambda keys: sampling.decode(logits_fn, jnp.zeros(2, jnp.int32), keys, num_tokens=N,
                                               codebook_size=4, sm_temp=1e3, r_temp=0.0, cfg_scale=3.0,
                                               trace=True))
    codes, trace = run(keys_for(range(2)))
    masked = np.asarray(trace.masked)
    newly = np.concatenate([~masked[:1], masked[:-1] & ~masked[1:]])  # (steps, batch, N)
    step_of = newly.argmax(0)  # step at which each token was revealed
    want = np.where(step_of <= 2, 0, 1)
    np.testing.assert_array_equal(np.asarray(codes), want)
    assert (want == 0).sum() == 2 * sum(sampling.reveal_schedule(8, N)[:3])


def test_same_samples_whatever_the_batch(guided):
    labels, decode = LABELS, guided
    whole = np.asarray(decode(labels, keys_for(range(4))))
    halves = np.concatenate([np.asarray(decode(labels[:2], keys_for(range(2)))),
                             np.asarray(decode(labels[2:], keys_for(range(2, 4))))])
    np.testing.assert_array_equal(whole, halves)
    other_seed = np.asarray(decode(labels, keys_for(range(4), seed=1)))
    assert (other_seed != whole).mean() > 0.3


def test_bad_options():
    with pytest.raises(ValueError, match="unknown randomize"):
        sampling.decode(lambda t, y, d: None, jnp.zeros(1, jnp.int32), keys_for([0]), randomize="gumbel")
