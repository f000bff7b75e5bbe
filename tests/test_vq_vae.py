"""VQ-VAE model: configs, parameter count and key set against taming's modules, the quantizer against taming's
VectorQuantizer2 on identical latents (indices, straight-through, legacy loss placement, gradients, ties), the
tiny model against a taming VQModel assembled from Encoder/Decoder/VectorQuantizer2, bf16, the jit/grad path,
codebook statistics, and save/load."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import vq_refs as refs
from flax import nnx
from taming.modules.vqvae.quantize import VectorQuantizer2

from eqvae_jax.convert import vq_vae as conv
from eqvae_jax.models import vq_vae, weights
from eqvae_jax.models.layers import Trunk

CFG = vq_vae.tiny()


def _fp32_ties(d: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether distances d[..., a] and d[..., b] are equal up to float32 rounding of d (a tie the two
    frameworks may break differently: their dot products round differently)."""
    da = np.take_along_axis(d, a[..., None], -1)[..., 0]
    db = np.take_along_axis(d, b[..., None], -1)[..., 0]
    return np.abs(da - db) <= 4 * np.spacing(np.maximum(np.abs(da), np.abs(db)).astype(np.float32))


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(vq_vae.PRESETS))
def test_config_json_round_trip(name):
    cfg = vq_vae.PRESETS[name]()
    assert vq_vae.VQVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)
    with pytest.raises(ValueError, match="unknown field"):
        vq_vae.VQVAEConfig.from_dict({"n_embeds": 3})
    with pytest.raises(ValueError, match="positive"):
        vq_vae.VQVAEConfig(n_embed=0)


TAMING_SHAPES = {
    "taming_f16_n1024": vq_vae.taming_f16_n1024(),
    "tiny": CFG,
    "tiny_res64_no_level_attn": vq_vae.tiny(resolution=64),
    "three_levels_attn_8_and_32": vq_vae.VQVAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                                     attn_resolutions=(8, 32), resolution=32, z_channels=4,
                                                     embed_dim=3, n_embed=5),
}


@pytest.mark.parametrize("name", sorted(TAMING_SHAPES))
def test_keys_and_shapes_match_taming(name):
    cfg = TAMING_SHAPES[name]
    with torch.device("meta"):
        ref = refs.TamingVQModel(cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    km = conv.key_map(cfg)
    assert set(km.torch_keys()) == set(expected)
    shapes = conv.model_shapes(cfg)
    assert km.torch_shapes(shapes) == {k: expected[k] if "attn" not in k or k.endswith("bias") or "norm" in k
                                       else expected[k][:2] for k in expected}
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(int(np.prod(s)) for s in expected.values())
    if name == "taming_f16_n1024":
        assert n == 72_141_699  # 72.142M with both quant convs
        assert any(k.startswith("encoder.down.4.attn.1.") for k in expected)
        assert not any(".attn." in k for k in expected if k.startswith(("encoder.down.3", "decoder.up.3")))


def test_attention_follows_the_configured_resolution_not_the_input():
    t = Trunk(128, (1, 1, 2, 2, 4), 2, attn_resolutions=(16,), resolution=256)
    assert t.encoder_attention() == t.decoder_attention() == (False, False, False, False, True)
    t = Trunk(32, (1, 2), 1, attn_resolutions=(16,), resolution=64)
    assert t.encoder_attention() == t.decoder_attention() == (False, False)


# ---------------------------------------------------------------------------------------------- quantizer


def _quantizer_pair(n: int, dim: int, legacy: bool, seed: int) -> tuple[vq_vae.VectorQuantizer, VectorQuantizer2]:
    torch.manual_seed(seed)
    ref = VectorQuantizer2(n, dim, beta=0.25, legacy=legacy)  # taming's uniform(-1/n, 1/n) codebook
    ours = vq_vae.VectorQuantizer(n, dim, 0.25, legacy, rngs=nnx.Rngs(0))
    ours.embedding[...] = jnp.asarray(ref.embedding.weight.detach().numpy())
    return ours, ref


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_matches_vector_quantizer2_on_identical_latents(legacy):
    """Default (taming-init) codebook, identical latents: indices identical but for float32 ties, the loss with
    beta on the right term, and the gradients of a downstream loss w.r.t. latents and codebook."""
    ours, ref = _quantizer_pair(64, 8, legacy, seed=1)
    z = np.random.default_rng(2).normal(0, 0.3, (2, 6, 5, 8)).astype(np.float32)
    ct = np.random.default_rng(3).normal(size=z.shape).astype(np.float32)

    zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    zq_t, loss_t, (_, _, idx_t) = ref(zt)
    (torch.sum(zq_t * torch.from_numpy(ct.transpose(0, 3, 1, 2).copy())) + 3.0 * loss_t).backward()

    graphdef, state = nnx.split(ours)

    def f(state, z):
        out = nnx.merge(graphdef, state)(z)
        return jnp.sum(out.quantized * ct) + 3.0 * out.codebook_loss, out

    (_, out), (g_state, g_z) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(state, jnp.asarray(z))
    idx_t = idx_t.numpy().reshape(2, 6, 5)
    e = ref.embedding.weight.detach().numpy()
    d = np.sum(z**2, -1, keepdims=True) + np.sum(e**2, -1) - 2 * np.einsum("bhwc,nc->bhwn", z, e)
    differ = np.asarray(out.indices) != idx_t
    assert np.all(_fp32_ties(d, np.asarray(out.indices), idx_t)[differ]), "an index differs without a tie"
    print(f"legacy={legacy}: {differ.sum()} of {differ.size} indices differ (all float32 ties)")
    same = ~differ
    np.testing.assert_allclose(np.asarray(out.quantized)[same], zq_t.detach().numpy().transpose(0, 2, 3, 1)[same],
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(out.codebook_loss, loss_t.item(), rtol=1e-6)
    if not differ.any():  # gradients through the same codes
        np.testing.assert_allclose(g_z, zt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-8)
        g_e = np.asarray(g_state["embedding"][...])
        np.testing.assert_allclose(g_e, ref.embedding.weight.grad.numpy(), rtol=1e-5, atol=1e-9)
        assert np.abs(g_e).max() > 0


def test_quantizer_takes_the_first_index_on_exact_ties_and_straight_through():
    ours, ref = _quantizer_pair(6, 3, True, seed=0)
    e = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    e[4] = e[1]  # an exact duplicate: every latent nearest to it ties between 1 and 4
    ours.embedding[...] = jnp.asarray(e)
    with torch.no_grad():
        ref.embedding.weight.copy_(torch.from_numpy(e))
    z = np.repeat(e[None, None, [1, 4, 2]], 2, axis=0).astype(np.float32) + 1e-3  # (2, 1, 3, 3)
    out = ours(jnp.asarray(z))
    _, _, (_, _, idx) = ref(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(out.indices).ravel(), idx.numpy())
    np.testing.assert_array_equal(np.asarray(out.indices)[0, 0], [1, 1, 2])  # torch.argmin: first minimum
    grad = jax.grad(lambda a: jnp.sum(ours(a).quantized * 2.0))(jnp.asarray(z))
    np.testing.assert_array_equal(grad, np.full(z.shape, 2.0, np.float32))  # identity straight through


def test_codebook_statistics():
    idx = jnp.asarray([[0, 0, 1], [1, 3, 3]])
    counts = vq_vae.code_counts(idx, 5)
    np.testing.assert_array_equal(counts, [2, 2, 0, 2, 0])
    assert float(vq_vae.codebook_usage(counts)) == pytest.approx(0.6)
    assert float(vq_vae.perplexity(counts)) == pytest.approx(3.0, rel=1e-6)
    assert float(vq_vae.perplexity(vq_vae.code_counts(jnp.zeros((4,), jnp.int32), 5))) == pytest.approx(1.0)
    # a mask counts only the valid images (not the padding of a last evaluation batch)
    np.testing.assert_array_equal(vq_vae.code_counts(idx, 5, jnp.asarray([False, True])), [0, 1, 0, 2, 0])


# ---------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny():
    ref = refs.random_taming(CFG, seed=5, codebook_std=0.3)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    vq = refs.flax_from_taming(ref, CFG)
    return dict(ref=ref, vq=vq, x=x, want=refs.taming_outputs(ref, x), got=refs.jax_outputs(vq, x))


def test_tiny_parity_with_taming(tiny):
    codebook = tiny["ref"].quantize.embedding.weight.detach().numpy()
    refs.assert_parity(tiny["got"], tiny["want"], codebook, "tiny 32x32")
    assert tiny["got"]["indices"].shape == (2, 16, 16)
    assert tiny["got"]["latents"].shape == (2, 16, 16, CFG.embed_dim)


def test_bf16_compute_is_close_and_keeps_float32_interfaces(tiny):
    vq16 = refs.flax_from_taming(tiny["ref"], dataclasses.replace(CFG, dtype="bfloat16"))
    out = vq16.encode(tiny["x"])
    assert out.latents.dtype == out.quantized.dtype == jnp.float32 and out.indices.dtype == jnp.int32
    assert vq16.quantize.embedding[...].dtype == jnp.float32 and vq16.encoder.conv_in.kernel[...].dtype == jnp.float32
    dec = vq16.decode(jnp.asarray(tiny["got"]["quantized"]))
    assert dec.dtype == jnp.float32
    err = refs.max_err(dec, tiny["got"]["decoded"])
    agree = float(np.mean(np.asarray(out.indices) == tiny["got"]["indices"]))
    print(f"bf16 vs fp32: decode max abs err {err:.3g}, index agreement {agree:.3f}")
    assert err < 0.1 and agree > 0.8


def test_jit_grad_reaches_encoder_through_straight_through_and_codebook_through_its_loss(tiny):
    graphdef, params = nnx.split(tiny["vq"])
    x = jnp.asarray(tiny["x"])

    def rec_loss(p):
        recon, out = nnx.merge(graphdef, p, copy=True)(x)
        return jnp.mean(jnp.abs(recon - x)), out

    def codebook_only(p):
        return nnx.merge(graphdef, p, copy=True).encode(x).codebook_loss

    g_rec, out = jax.jit(jax.grad(rec_loss, has_aux=True))(params)
    assert float(jnp.abs(g_rec["encoder"]["conv_in"]["kernel"][...]).max()) > 0  # straight through
    assert float(jnp.abs(g_rec["quantize"]["embedding"][...]).max()) == 0  # no codebook grad from the decoder
    g_cb = jax.jit(jax.grad(codebook_only))(params)
    used = np.unique(np.asarray(out.indices))
    g_e = np.asarray(g_cb["quantize"]["embedding"][...])
    assert np.abs(g_e[used]).min(axis=1).max() > 0 and not np.delete(g_e, used, axis=0).any()


def test_build_save_load_round_trip_and_dtype_override(tmp_path):
    vq = vq_vae.build(CFG, seed=3)
    e = np.asarray(vq.quantize.embedding[...])
    assert np.abs(e).max() <= 1.0 / CFG.n_embed and e.std() > 0.2 / CFG.n_embed  # taming's uniform init
    vq_vae.save(vq, tmp_path / "w")
    back = vq_vae.load(tmp_path / "w", dtype="bfloat16")
    assert back.config == dataclasses.replace(CFG, dtype="bfloat16")
    a, b = weights.flat_variables(vq), weights.flat_variables(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(e, np.asarray(vq_vae.build(CFG, seed=4).quantize.embedding[...]))
    weights.save_weights(tmp_path / "kl", "kl_vae", {}, {"w": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="holds a 'kl_vae' model, not 'vq_vae'"):
        vq_vae.load(tmp_path / "kl")
