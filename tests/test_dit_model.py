"""DiT backbone: parity with a torch copy of the official class, embeddings, init, dropout, CFG, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_parity import TINY, inputs, ours_from, randomized_reference, run_ref
from dit_reference import get_2d_sincos_pos_embed
from flax import nnx

from eqvae_jax.models.dit import (
    DiTConfig,
    build,
    dit_config,
    dit_flops,
    sincos_pos_embed_2d,
    timestep_embedding,
)
from eqvae_jax.models.variables import Frozen
from eqvae_jax.models.weights import flat_variables


def test_parity_with_official_reference():
    ref = randomized_reference(TINY)
    model = ours_from(ref, TINY)
    x, t, y = inputs(TINY)
    want = run_ref(ref, x, t, y)
    got = np.asarray(jax.jit(lambda a, b, c: model(a, b, c))(x, t, y))
    assert got.shape == (3, 8, 8, 8)
    err = np.abs(got - want).max()
    assert err <= 1e-4, err
    assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero outputs


def test_no_sigma_patch4_parity():
    cfg = DiTConfig(
        input_size=16,
        patch_size=4,
        in_channels=3,
        hidden_size=96,
        depth=1,
        num_heads=3,
        num_classes=5,
        class_dropout_prob=0.0,
        learn_sigma=False,
    )
    ref = randomized_reference(cfg, seed=3, std=0.1)
    x, t, y = inputs(cfg, seed=2)
    got = np.asarray(ours_from(ref, cfg)(x, t, y))
    assert got.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(got, run_ref(ref, x, t, y), atol=1e-4, rtol=0)


def test_fixed_embeddings_match_reference():
    np.testing.assert_array_equal(
        sincos_pos_embed_2d(64, 4), get_2d_sincos_pos_embed(64, 4).astype(np.float32)
    )
    t = torch.tensor([0.0, 3.5, 999.0])
    from dit_reference import TimestepEmbedder

    want = TimestepEmbedder.timestep_embedding(t, 256).numpy()
    got = np.asarray(timestep_embedding(jnp.asarray(t.numpy())))
    np.testing.assert_allclose(got[:2], want[:2], atol=2e-6)
    np.testing.assert_allclose(got[2], want[2], atol=6e-5)  # one float32 ulp of an argument near 999
    model = build(TINY)
    assert isinstance(model.pos_embed, Frozen)
    assert "pos_embed" not in flat_variables(model, nnx.Param)


def test_reference_init():
    model = build(TINY)
    v = flat_variables(model)
    for key in (
        "blocks/adaLN_modulation_1/kernel",
        "final_layer/linear/kernel",
        "final_layer/adaLN_modulation_1/kernel",
        "blocks/attn/qkv/bias",
    ):
        assert not v[key].any(), key
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)); patch embed uses fan_in = p*p*C like a Linear
    qkv = v["blocks/attn/qkv/kernel"]
    assert np.abs(qkv).max() <= np.sqrt(6 / (64 + 192)) and np.abs(qkv).max() > 0.8 * np.sqrt(6 / (64 + 192))
    assert not np.array_equal(qkv[0], qkv[1])  # blocks are initialised independently
    pe = v["x_embedder/proj/kernel"]
    assert np.abs(pe).max() <= np.sqrt(6 / (16 + 64))
    assert 0.015 < v["y_embedder/embedding_table/embedding"].std() < 0.025
    x, t, y = inputs(TINY)
    assert not np.asarray(model(x, t, y)).any()  # adaLN-Zero: the fresh model outputs zeros


def test_label_dropout():
    ref = randomized_reference(TINY)
    model = ours_from(ref, TINY)
    x, t, y = inputs(TINY)
    null = np.full_like(y, TINY.num_classes)
    dropped = model(x, t, y, force_drop_ids=jnp.ones(3, jnp.int32))
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(model(x, t, null)), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(model(x, t, y, force_drop_ids=jnp.zeros(3, jnp.int32))),
        np.asarray(model(x, t, y)),
        atol=1e-6,
    )
    emb = model.y_embedder
    labels = jnp.arange(2000) % 10
    a = emb(labels, drop_key=jax.random.key(0))
    table = emb.embedding_table.embedding[...]
    is_null = np.all(np.asarray(a) == np.asarray(table[10]), axis=-1)
    assert 0.07 < is_null.mean() < 0.13  # class_dropout_prob 0.1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(emb(labels, drop_key=jax.random.key(0))))
    assert np.array_equal(np.asarray(emb(labels)), np.asarray(table[labels]))  # no key: no dropout


def test_cfg_model_fn_matches_reference_forward_with_cfg():
    """The samplers' guided model (`guidance.cfg_model_fn` around our DiT) against the reference
    `forward_with_cfg` arithmetic on the torch DiT: [x; x] with [y; null], guided eps channels (all, or the
    reference's first 3), variance channels the conditional ones."""
    from eqvae_jax.diffusion.guidance import cfg_model_fn

    ref = randomized_reference(TINY)
    model = ours_from(ref, TINY)
    x, t, y = inputs(TINY, n=2)
    both = run_ref(ref, np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([y, np.full_like(y, 10)]))
    c, u = both[:2], both[2:]
    for scale, channels in [(4.0, None), (1.5, 3)]:
        fn = cfg_model_fn(lambda a, b, labels: model(a, b, labels), jnp.asarray(y), 10, scale, 4, channels)
        out = np.asarray(fn(jnp.asarray(x), jnp.asarray(t)))
        n = 4 if channels is None else channels
        np.testing.assert_allclose(out[..., :n], u[..., :n] + scale * (c[..., :n] - u[..., :n]), atol=3e-4)
        np.testing.assert_allclose(out[..., n:], c[..., n:], atol=1e-4)


def test_bf16_compute_keeps_fp32_params():
    ref = randomized_reference(TINY)
    fp32 = ours_from(ref, TINY)
    bf16 = ours_from(ref, TINY, compute_dtype="bfloat16")
    assert all(v.dtype == np.float32 for v in flat_variables(bf16).values())
    x, t, y = inputs(TINY)
    a = np.asarray(fp32(x, t, y))
    b = bf16(x, t, y)
    assert b.dtype == jnp.float32
    rel = np.abs(np.asarray(b) - a).max() / np.abs(a).max()
    assert 1e-6 < rel < 5e-2, rel  # bf16 really ran, and stayed close


def test_remat_same_output_and_grad():
    ref = randomized_reference(TINY)
    x, t, y = inputs(TINY)

    def loss_and_grad(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(x, t, y) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    l1, g1 = loss_and_grad(ours_from(ref, TINY))
    l2, g2 = loss_and_grad(ours_from(ref, TINY, remat=True))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert "pos_embed" not in str(jax.tree_util.tree_structure(g1))


def test_configs_and_flops():
    names = {(s, p): dit_config(s, p) for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert len(names) == 12
    assert names[("XL", 2)].depth == 28 and names[("XL", 2)].hidden_size == 1152
    assert names[("B", 4)].num_heads == 12 and names[("B", 4)].patch_size == 4
    with pytest.raises(ValueError):
        dit_config("M", 2)
    # DiT paper, Table 4 "Gflops" (multiply-accumulates) per 256x256 image
    paper = {
        ("S", 2): 6.06,
        ("B", 2): 23.01,
        ("L", 2): 80.71,
        ("XL", 2): 118.64,
        ("XL", 4): 29.05,
        ("XL", 8): 7.39,
    }
    for key, gmacs in paper.items():
        assert dit_flops(names[key]) / 2e9 == pytest.approx(gmacs, rel=3e-3)
    assert dit_flops(names[("B", 2)], batch=4, train=True) == 12 * dit_flops(names[("B", 2)])
