"""KL-VAE model: configs, building blocks and posterior against PyTorch references, diffusers parity on small
configs, the bf16 compute option, and the jit/grad path the train step uses."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import kl_vae_refs as refs
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import nnx

from eqvae_jax.convert import kl_vae_keys as keys
from eqvae_jax.models import kl_vae, weights
from eqvae_jax.models.layers import AttnBlock, GroupNorm

TOL = 1e-4

# Small configs that between them switch every architecture option away from its SD-VAE value.
SMALL_CONFIGS = {
    "tiny": kl_vae.tiny(),
    "f4_groups8_no_mid_attn": kl_vae.KLVAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2,
                                                 norm_num_groups=8, mid_attention=False, sample_size=16),
    "sd3_like": kl_vae.tiny(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=1.5305, shift_factor=0.0609),
    "in1_out2_post_quant_only": kl_vae.tiny(in_channels=1, out_channels=2, use_quant_conv=False),
}


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _from_torch(model: torch.nn.Module, cfg: kl_vae.KLVAEConfig, layout: str) -> kl_vae.KLVAE:
    vae = kl_vae.abstract(cfg)
    weights.assign_variables(vae, keys.torch_to_flax(refs.numpy_state_dict(model), cfg, layout))
    return vae


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(kl_vae.PRESETS))
def test_config_json_round_trip(name):
    cfg = kl_vae.PRESETS[name]()
    assert kl_vae.KLVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)  # static module attribute: must be hashable for jit


def test_config_rejects_unknown_field_and_dtype():
    with pytest.raises(ValueError, match="unknown field"):
        kl_vae.KLVAEConfig.from_dict({"base_channel": 64})
    with pytest.raises(TypeError):
        kl_vae.KLVAEConfig(dtype="float33")


@pytest.mark.parametrize("name", ["sd_vae", "sdxl_vae", "sd3_vae"])
def test_presets_have_the_diffusers_parameter_count(name):
    cfg = kl_vae.PRESETS[name]()
    with torch.device("meta"):
        ref = AutoencoderKL(**refs.diffusers_kwargs(cfg))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = keys.model_shapes(cfg)
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(int(np.prod(s)) for s in expected.values())
    assert set(keys.key_map(cfg, "diffusers").torch_keys()) == set(expected)
    if name == "sd_vae":
        assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863


def test_sd3_preset_has_no_quant_convs():
    vae = kl_vae.abstract(kl_vae.sd3_vae())
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert vae.shift_factor == 0.0609 and vae.scaling_factor == 1.5305


def test_normalize_latents_inverts():
    vae = kl_vae.abstract(kl_vae.sd3_vae())
    z = jnp.linspace(-3, 3, 16).reshape(1, 1, 1, 16)
    np.testing.assert_allclose(vae.normalize_latents(z), (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(vae.denormalize_latents(vae.normalize_latents(z)), z, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("groups", [32, 8])
@pytest.mark.parametrize(("offset", "tol"), [(0.0, 5e-6), (100.0, 1e-4)])
def test_groupnorm_matches_torch(groups, offset, tol):
    """Against torch.nn.GroupNorm and a float64 ground truth. At offset 100 fp32 input rounding alone costs
    ~3e-5 (torch too); one-pass E[x^2]-E[x]^2 statistics would be off by ~1e-3."""
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((2, 5, 7, 64))).astype(np.float32)
    w, b = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    ref = torch.nn.GroupNorm(groups, 64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
        expected = ref(torch.from_numpy(_nchw(x))).numpy().transpose(0, 2, 3, 1)
    g = x.astype(np.float64).reshape(2, 5, 7, groups, 64 // groups)
    centered = g - g.mean(axis=(1, 2, 4), keepdims=True)
    var = (centered**2).mean(axis=(1, 2, 4), keepdims=True)
    truth = (centered / np.sqrt(var + 1e-6)).reshape(x.shape) * w + b
    gn = GroupNorm(64, groups, 1e-6)
    gn.scale.set_value(jnp.asarray(w))
    gn.bias.set_value(jnp.asarray(b))
    out = gn(jnp.asarray(x))
    assert refs.max_err(out, expected) < tol and refs.max_err(out, truth) < tol


@pytest.mark.parametrize("groups", [32, 8])
def test_groupnorm_gradients_match_torch(groups):
    rng = np.random.default_rng(1)
    x = (2.0 + 3.0 * rng.standard_normal((2, 6, 5, 64))).astype(np.float32)
    w, b = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    ct = rng.standard_normal(x.shape).astype(np.float32)
    ref = torch.nn.GroupNorm(groups, 64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    tx = torch.from_numpy(_nchw(x)).requires_grad_()
    (ref(tx) * torch.from_numpy(_nchw(ct))).sum().backward()
    gn = GroupNorm(64, groups, 1e-6)
    gn.scale.set_value(jnp.asarray(w))
    gn.bias.set_value(jnp.asarray(b))
    graph, params = nnx.split(gn)
    grads = jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x) * ct), argnums=(0, 1))(params, jnp.asarray(x))
    assert refs.max_err(grads[1], tx.grad.numpy().transpose(0, 2, 3, 1)) < 2e-5
    assert refs.max_err(grads[0]["scale"][...], ref.weight.grad.numpy()) < 2e-5
    assert refs.max_err(grads[0]["bias"][...], ref.bias.grad.numpy()) < 2e-5


def test_groupnorm_bf16_computes_in_float32():
    x = (3.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 32))).astype(jnp.bfloat16)
    out = GroupNorm(32, 8, dtype=jnp.bfloat16)(x)
    assert out.dtype == jnp.bfloat16
    expected = GroupNorm(32, 8)(x.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_attention_softmax_runs_in_float32_under_bf16():
    block = AttnBlock(32, num_groups=8, epsilon=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 4, 32), jnp.bfloat16)
    graphdef, state = nnx.split(block)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    dtypes = set()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "exp":
                dtypes.update(v.aval.dtype for v in eqn.outvars)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert block(x).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------- posterior


def _moments(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((3, 4, 5, 8)).astype(np.float32) * 2
    m[0, 0, 0, 4:] = [-50.0, 45.0, -30.5, 20.5]  # logvar outside [-30, 20]: clipped
    return m


def test_posterior_matches_diffusers_formulas():
    moments = _moments()
    post = kl_vae.DiagonalGaussian.from_moments(jnp.asarray(moments))
    ref = DiagonalGaussianDistribution(torch.from_numpy(_nchw(moments)))
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(post.logvar, to_nhwc(ref.logvar))
    np.testing.assert_array_equal(post.mean, to_nhwc(ref.mean))
    np.testing.assert_allclose(post.std, to_nhwc(ref.std), rtol=1e-6)
    np.testing.assert_allclose(post.var, to_nhwc(ref.var), rtol=1e-6)
    np.testing.assert_array_equal(post.mode(), to_nhwc(ref.mode()))
    assert post.kl().shape == (3,)
    np.testing.assert_allclose(post.kl(), ref.kl().numpy(), rtol=1e-5)
    # the LDM DiagonalGaussianDistribution.kl, written out: 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) per example
    mu, lv = moments[..., :4].astype(np.float64), np.clip(moments[..., 4:], -30, 20).astype(np.float64)
    expected_kl = 0.5 * np.sum(mu**2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), expected_kl, rtol=1e-5)


def test_posterior_sample_is_reparameterised():
    post = kl_vae.DiagonalGaussian.from_moments(jnp.asarray(_moments(1)))
    key = jax.random.key(3)
    expected = post.mean + post.std * jax.random.normal(key, post.mean.shape)
    np.testing.assert_array_equal(post.sample(key), expected)
    assert not np.array_equal(post.sample(key), post.sample(jax.random.key(4)))
    # empirical moments over many draws
    shape = (4096, 1, 1, 2)
    small = kl_vae.DiagonalGaussian(mean=jnp.full(shape, 0.5), logvar=jnp.full(shape, -1.0))
    s = np.asarray(small.sample(jax.random.key(0)))
    assert abs(s.mean() - 0.5) < 0.03 and abs(s.std() - np.exp(-0.5)) < 0.03


def test_posterior_is_a_pytree_through_jit():
    post = jax.jit(kl_vae.DiagonalGaussian.from_moments)(jnp.asarray(_moments()))
    leaves = jax.tree_util.tree_leaves(post)
    assert len(leaves) == 2 and post.mean.shape == (3, 4, 5, 4)


# ---------------------------------------------------------------------------------------------- model


def test_shapes_and_downsample_factor():
    cfg = SMALL_CONFIGS["f4_groups8_no_mid_attn"]
    vae = kl_vae.abstract(cfg)
    graphdef, state = nnx.split(vae)
    assert cfg.downsample_factor == 4

    def run(state, x):
        model = nnx.merge(graphdef, state)
        post = model.encode(x)
        return post, model.decode(post.mode())

    post, rec = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, 16, 24, 3), jnp.float32))
    assert post.mean.shape == post.logvar.shape == (2, 4, 6, 4)
    assert rec.shape == (2, 16, 24, 3) and rec.dtype == jnp.float32
    assert vae.encoder.mid.attn_1 is None
    assert isinstance(vae.decoder.conv_out.kernel, nnx.Param)
    assert vae.decoder.conv_out.kernel.shape == (3, 3, 16, 3)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_parity_with_diffusers_small(name):
    cfg = SMALL_CONFIGS[name]
    ref = refs.random_diffusers(cfg, seed=1)
    vae = _from_torch(ref, cfg, "diffusers")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, cfg.in_channels)).astype(np.float32)
    mean, logvar, dec = refs.diffusers_outputs(ref, _nchw(x))
    got = refs.jax_outputs(vae, x, mean)
    errors = [refs.max_err(a, b) for a, b in zip(got, (mean, logvar, dec), strict=True)]
    print(f"{name}: max abs err mean/logvar/decode = {errors}")
    assert max(errors) <= TOL, errors
    assert np.abs(dec).max() > 0.1  # a non-trivial output


def test_bf16_compute_is_close_and_keeps_float32_interfaces():
    cfg = kl_vae.tiny()
    ref = refs.random_diffusers(cfg, seed=2)
    flat = keys.torch_to_flax(refs.numpy_state_dict(ref), cfg, "diffusers")
    fp32, bf16 = kl_vae.abstract(cfg), kl_vae.abstract(dataclasses.replace(cfg, dtype="bfloat16"))
    weights.assign_variables(fp32, flat)
    weights.assign_variables(bf16, flat)
    assert all(v.dtype == np.float32 for v in weights.flat_variables(bf16).values())  # params stay fp32
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    a, b = refs.jax_outputs(fp32, x, z), refs.jax_outputs(bf16, x, z)
    for lo, hi in zip(b, a, strict=True):
        assert lo.dtype == np.float32
        rel = refs.max_err(lo, hi) / np.abs(hi).max()
        assert 0 < rel < 0.05, rel  # bf16 really ran, and stayed close


def test_jit_grad_path_of_the_train_step():
    """split once, jit pure functions, merge inside: __call__ with and without a key, and the gradient at the
    adaptive-weight layer `decoder.conv_out.kernel`."""
    cfg = kl_vae.tiny()
    vae = _from_torch(refs.random_diffusers(cfg, seed=3), cfg, "diffusers")
    graphdef, params = nnx.split(vae, nnx.Param)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)

    @jax.jit
    def forward(params, x, key):
        model = nnx.merge(graphdef, params)
        rec_sample, post = model(x, key)
        rec_mode, _ = model(x)
        return rec_sample, rec_mode, model.decode(post.mean)

    rec_sample, rec_mode, rec_mean = forward(params, x, jax.random.key(1))
    np.testing.assert_array_equal(rec_mode, rec_mean)
    assert not np.allclose(rec_sample, rec_mode)

    def loss(params, x, key):
        rec, post = nnx.merge(graphdef, params)(x, key)
        return jnp.mean(jnp.abs(rec - x)) + 1e-6 * jnp.mean(post.kl())

    grads = jax.jit(jax.grad(loss))(params, x, jax.random.key(1))
    g = np.asarray(grads["decoder"]["conv_out"]["kernel"][...])
    assert g.shape == vae.decoder.conv_out.kernel.shape and np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_build_save_load_round_trip_and_dtype_override(tmp_path):
    vae = kl_vae.build(kl_vae.tiny(channel_mult=(1,)), seed=5)  # one level: few shapes, fast eager init
    # PyTorch-style init: conv weights and biases within +-1/sqrt(fan_in)
    kernel, bias = np.abs(vae.encoder.conv_in.kernel[...]), np.abs(vae.encoder.conv_in.bias[...])
    bound = 1 / np.sqrt(3 * 3 * 3)
    assert kernel.max() <= bound and bias.max() <= bound and kernel.max() > 0.8 * bound
    kl_vae.save(vae, tmp_path / "w")
    again = kl_vae.load(tmp_path / "w")
    assert again.config == vae.config
    a, b = weights.flat_variables(vae), weights.flat_variables(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    low = kl_vae.load(tmp_path / "w", dtype="bfloat16")
    assert low.config.dtype == "bfloat16" and low.decoder.conv_out.kernel.dtype == jnp.float32


def test_autoencoder_spec_builds_either_family_and_names_a_kind_mismatch(tmp_path):
    from eqvae_jax.models import vq_vae
    from eqvae_jax.models.autoencoders import AutoencoderSpec, build_autoencoder

    kl = build_autoencoder(AutoencoderSpec(init="random", preset="tiny", seed=1, scaling_factor=0.5))
    vq = build_autoencoder(AutoencoderSpec(kind="vq_vae", init="random", preset="tiny", seed=1))
    assert isinstance(kl, kl_vae.KLVAE) and kl.config.scaling_factor == 0.5
    assert isinstance(vq, vq_vae.VQVAE) and vq.config.n_embed == 64
    vq_vae.save(vq, tmp_path / "vq")
    assert AutoencoderSpec(kind="vq_vae", weights=str(tmp_path / "vq")).problems("model") == []
    assert AutoencoderSpec(weights=str(tmp_path / "vq")).problems("model") == [
        "model.weights holds a 'vq_vae' model, not 'kl_vae' (model.kind)"]
    assert "not a vq_vae preset" in AutoencoderSpec(kind="vq_vae", init="random").problems("model")[0]
    assert AutoencoderSpec(kind="gan").problems("vae") == ["vae.kind must be one of ['kl_vae', 'vq_vae'], not 'gan'"]
