"""MaskGIT transformer: parity with valeoai v1's MaskTransformer (tiny and paper width), init, class-token
position, dropout, bf16, remat, save/load and FSDP shardings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from maskgit_parity import TINY, inputs, ours_from, reference, run_ref, state_dict_np
from maskgit_reference import MaskTransformer

from eqvae_jax.convert.maskgit import valeoai_shapes, valeoai_to_flax
from eqvae_jax.models import maskgit
from eqvae_jax.models.weights import assign_variables, flat_variables
from eqvae_jax.parallel.mesh import SCANNED_LAYERS, make_mesh, param_shardings


def test_parity_tiny():
    ref = reference(TINY)
    model = ours_from(ref, TINY)
    tokens, labels, drop = inputs(TINY)
    want = run_ref(ref, tokens, labels, drop)
    got = np.asarray(jax.jit(lambda t, y, d: model(t, y, d))(tokens, labels, drop))
    assert got.shape == want.shape == (3, 16, 33)
    err = np.abs(got - want).max()
    print(f"tiny parity max abs err {err:.2e} (logits max {np.abs(want).max():.1f})")
    assert err <= 1e-4, err
    assert np.abs(want).max() > 1.0
    # the flat (B, N) token layout gives the same logits; a dropped label is not the label
    np.testing.assert_array_equal(np.asarray(model(tokens.reshape(3, -1), labels, drop)), np.asarray(model(
        tokens, labels, drop)))
    assert np.abs(np.asarray(model(tokens, labels, ~drop)) - got).max() > 1e-2


def test_parity_paper_width_two_layers():
    """The reference's own init at full width, with LayerNorm affines and the output bias random too.

    The token embedding is scaled by 1/4: at its N(0, 1) init the logits reach ~130, where float32 itself is
    ~1e-4 off (both implementations are 1.2e-4 from a float64 run of the reference); scaled, they reach ~35.
    """
    cfg = maskgit.base(depth=2)
    ref = reference(cfg, seed=1, std=None)
    with torch.no_grad():
        ref.tok_emb.weight.mul_(0.25)
        ref.bias.copy_(torch.randn_like(ref.bias))
        for name, p in ref.named_parameters():
            if "norm" in name or name.startswith(("first_layer.0", "first_layer.4", "last_layer.0", "last_layer.4")):
                p.add_(torch.randn_like(p) * 0.1)
    tokens, labels, drop = inputs(cfg, n=2, seed=3)
    want = run_ref(ref, tokens, labels, drop)
    got = np.asarray(ours_from(ref, cfg)(tokens, labels, drop))
    err = np.abs(got - want).max()
    print(f"paper-width (768, 16 heads, MLP 3072, 2 layers) parity max abs err {err:.2e} "
          f"(logits max {np.abs(want).max():.1f})")
    assert got.shape == (2, 256, 1025)
    assert err <= 1e-4, err
    assert np.abs(want).max() > 10


def test_state_dict_keys_and_init_match_reference():
    with torch.device("meta"):
        base_ref = MaskTransformer(depth=24, heads=16)
    want = {k: tuple(v.shape) for k, v in base_ref.state_dict().items()}
    assert valeoai_shapes(maskgit.base()) == want  # same keys and shapes, hence the same parameter count

    cfg = maskgit.tiny()
    ref = state_dict_np(reference(cfg, std=None))
    ours = flat_variables(maskgit.build(cfg, seed=3))
    mine = maskgit.init_values(cfg, seed=3)
    for key, value in mine.items():
        np.testing.assert_array_equal(ours[key], value)
    ref_flat = valeoai_to_flax(ref, cfg)
    for key, want_v in ref_flat.items():
        got_v = ours[key]
        if not want_v.any():
            assert not got_v.any(), key
            continue
        assert np.isclose(got_v.mean(), want_v.mean(), atol=0.2 * want_v.std() + 1e-6), key
        assert np.isclose(got_v.std(), want_v.std(), rtol=0.15), key
        if key.endswith(("kernel", "bias")):  # uniform draws: the same bound
            assert np.abs(got_v).max() <= 1.05 * np.abs(want_v).max(), key
    assert not np.array_equal(ours["blocks/ff/net_0/kernel"][0], ours["blocks/ff/net_0/kernel"][1])


def test_class_token_first_is_a_permutation_of_class_token_last():
    ref = reference(TINY)
    last = ours_from(ref, TINY)
    first = maskgit.abstract(dataclasses.replace(TINY, class_token_first=True))
    flat = valeoai_to_flax(state_dict_np(ref), TINY)
    flat["pos_emb"] = np.roll(flat["pos_emb"], 1, axis=1)  # class position moves from the end to the front
    flat["bias"] = np.roll(flat["bias"], 1, axis=0)
    assign_variables(first, flat)
    tokens, labels, drop = inputs(TINY)
    np.testing.assert_allclose(np.asarray(first(tokens, labels, drop)), np.asarray(last(tokens, labels, drop)),
                               atol=2e-5)


def test_dropout_only_with_a_key():
    ref = reference(TINY, std=0.1)
    model = ours_from(ref, TINY)
    tokens, labels, drop = inputs(TINY)
    eval_out = np.asarray(model(tokens, labels, drop))
    train = jax.jit(lambda m, key: m(tokens, labels, drop, dropout_key=key))
    k = jax.random.key(0)
    a = np.asarray(train(model, k))
    assert np.abs(a - eval_out).max() > 1e-2
    np.testing.assert_array_equal(a, np.asarray(train(model, k)))
    assert np.abs(a - np.asarray(train(model, jax.random.key(1)))).max() > 1e-2
    no_dropout = ours_from(ref, TINY, dropout=0.0)
    np.testing.assert_allclose(np.asarray(no_dropout(tokens, labels, drop, dropout_key=k)), eval_out, atol=1e-6)
    # torch in train mode with the same weights is as far from eval as ours (dropout 0.1 everywhere it applies)
    ref.train()
    torch.manual_seed(0)
    ref_train = run_ref(ref, tokens, labels, drop)
    ref.eval()
    ratio = np.abs(a - eval_out).mean() / np.abs(ref_train - eval_out).mean()
    assert 0.5 < ratio < 2.0, ratio


def test_bf16_compute_keeps_fp32_params():
    ref = reference(TINY, std=0.1)
    fp32 = ours_from(ref, TINY)
    bf16 = ours_from(ref, TINY, compute_dtype="bfloat16")
    assert all(v.dtype == np.float32 for v in flat_variables(bf16).values())
    tokens, labels, drop = inputs(TINY)
    a = np.asarray(fp32(tokens, labels, drop))
    b = bf16(tokens, labels, drop)
    assert b.dtype == jnp.float32
    rel = np.abs(np.asarray(b) - a).max() / np.abs(a).max()
    assert 1e-5 < rel < 5e-2, rel


def test_remat_same_loss_and_grad():
    ref = reference(TINY, std=0.1)
    tokens, labels, drop = inputs(TINY)

    def loss_and_grad(model):
        fn, params = maskgit.functional(model)

        def loss(p):
            return jnp.mean(fn.apply(p, tokens, labels, drop, dropout_key=jax.random.key(2)) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    l1, g1 = loss_and_grad(ours_from(ref, TINY))
    l2, g2 = loss_and_grad(ours_from(ref, TINY, remat=True))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # only the image positions and the code + mask columns of the bias receive gradient, as in the reference
    g_bias = np.asarray(g1["bias"])
    assert np.abs(g_bias[:16, :33]).max() > 0 and not g_bias[16:].any() and not g_bias[:, 33:].any()


def test_save_load_round_trip(tmp_path):
    model = maskgit.build(TINY, seed=5)
    maskgit.save(model, tmp_path / "w")
    loaded = maskgit.load(str(tmp_path / "w"), compute_dtype="bfloat16")
    assert loaded.config == dataclasses.replace(TINY, compute_dtype="bfloat16")
    for key, value in flat_variables(model).items():
        np.testing.assert_array_equal(flat_variables(loaded)[key], value)
    assert maskgit.MaskGITConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown field"):
        maskgit.MaskGITConfig.from_dict({**TINY.to_dict(), "width": 3})


def test_presets_and_flops():
    b = maskgit.PRESETS["base"]()
    assert (b.depth, b.hidden_dim, b.heads, b.mlp_dim, b.vocab_size, b.seq_len) == (24, 768, 16, 3072, 2026, 257)
    assert (b.mask_id, b.drop_label_id, b.num_logits) == (1024, 2025, 1025)
    assert maskgit.PRESETS["tiny"]().vocab_size == 2026
    n, d = 257, 768
    per_layer = 2 * (n * (4 * d * d + 2 * d * 3072) + 2 * n * n * d)
    assert maskgit.maskgit_flops(maskgit.base(depth=1)) == pytest.approx(
        per_layer + 2 * (3 * n * d * d + 256 * d * 1025))
    assert maskgit.maskgit_flops(b, batch=4, train=True) == 12 * maskgit.maskgit_flops(b)


def test_fsdp_shardings_skip_the_scanned_depth_axis():
    params = nnx.state(maskgit.abstract(maskgit.base()), nnx.Param).to_pure_dict()
    sh = param_shardings(params, make_mesh(2, 4), SCANNED_LAYERS)  # the table the MaskGIT job uses
    assert sh["blocks"]["ff"]["net_0"]["kernel"].spec == P(None, None, "fsdp")  # (24, 768, 3072)
    assert sh["blocks"]["attn"]["mha"]["in_proj"]["kernel"].spec == P(None, None, "fsdp")  # (24, 768, 2304)
    assert sh["blocks"]["attn"]["norm"]["scale"].spec == P()  # (24, 768): small
    assert sh["tok_emb"]["embedding"].spec == P(None, "fsdp")  # 2026 rows do not split in 4
    assert sh["first_layer"]["linear_2"]["kernel"].spec == P("fsdp", None)
    for path, s in jax.tree_util.tree_leaves_with_path(sh["blocks"]):
        assert not s.spec or s.spec[0] is None, path
