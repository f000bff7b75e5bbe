"""Unit checks of the loss pieces: reductions, KL, GAN terms, adaptive weight, warm-up, LPIPS dropout switch,
and the last-layer VJP used for the adaptive weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toys import ToyLPIPS, ToyVAE

from eqvae_jax.losses import autoencoder as ae
from eqvae_jax.losses import gan
from eqvae_jax.losses.nnx_vjp import vjp_wrt_variable
from eqvae_jax.losses.reconstruction import kl_loss, nll_loss
from eqvae_jax.models.discriminator import NLayerDiscriminator
from eqvae_jax.models.kl_vae import DiagonalGaussian
from eqvae_jax.typed_config import default_config, parse


def _images(seed: int, shape=(2, 8, 8, 3)) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32), jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)


def test_nll_sum_is_per_image_l1_sum_plus_chw_lpips():
    x, y = _images(0)
    lp = jnp.asarray([0.3, 0.7])
    loss, terms = nll_loss(x, y, lp, perceptual_weight=0.5)
    want = (np.abs(np.asarray(x) - np.asarray(y)).sum() + 8 * 8 * 3 * 0.5 * (0.3 + 0.7)) / 2
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    mean, _ = nll_loss(x, y, lp, perceptual_weight=0.5, reduction="mean")
    np.testing.assert_allclose(mean, np.abs(np.asarray(x) - np.asarray(y)).mean() + 0.25, rtol=1e-6)
    np.testing.assert_allclose(terms["rec_l1"], np.abs(np.asarray(x) - np.asarray(y)).mean(), rtol=1e-6)
    logvar_loss, _ = nll_loss(x, y, lp, logvar=0.5)
    np.testing.assert_allclose(logvar_loss, nll_loss(x, y, lp)[0] / np.exp(0.5) + 0.5 * 192, rtol=1e-6)
    with pytest.raises(ValueError):
        nll_loss(x, y, lp, reduction="avg")


def test_kl_sum_over_batch_and_mean_per_element():
    moments = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 5, 8)), jnp.float32)
    post = DiagonalGaussian.from_moments(moments)
    per = 0.5 * (post.mean**2 + post.var - 1 - post.logvar)
    np.testing.assert_allclose(kl_loss(post), per.sum() / 3, rtol=1e-6)
    np.testing.assert_allclose(kl_loss(post, "mean"), per.mean(), rtol=1e-6)


def test_gan_terms_and_adaptive_weight():
    real, fake = jnp.asarray([[2.0, -0.5]]), jnp.asarray([[-3.0, 0.25]])
    np.testing.assert_allclose(gan.hinge_d_loss(real, fake), 0.5 * ((0 + 1.5) / 2 + (0 + 1.25) / 2))
    np.testing.assert_allclose(gan.g_loss(fake), 1.375)
    a, b = jnp.full((3, 3), 2.0), jnp.full((3, 3), 1.0)
    np.testing.assert_allclose(gan.adaptive_weight(a, b, 0.5), 0.5 * 6.0 / (3.0 + 1e-4), rtol=1e-6)
    assert float(gan.adaptive_weight(a, jnp.zeros((3, 3)), 0.5)) == pytest.approx(0.5e4)  # clamped to 1e4
    assert float(jax.grad(lambda s: gan.adaptive_weight(s * a, b, 0.5))(1.0)) == 0.0  # stop-gradient
    step_fn = jax.jit(lambda s: gan.disc_factor(s, 10, 0.7))
    assert [float(step_fn(s)) for s in (0, 9, 10, 11)] == [0.0, 0.0, pytest.approx(0.7), pytest.approx(0.7)]


def test_last_layer_vjp_equals_the_direct_gradient():
    vae = ToyVAE(0)
    z = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 2)), jnp.float32)
    ct = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
    out, vjp = vjp_wrt_variable(vae, ae.DECODER_LAST_LAYER, lambda m: m.decode(z))
    np.testing.assert_allclose(out, vae.decode(z), rtol=1e-6)
    graphdef, state = nnx.split(vae)

    def direct(w):
        m = nnx.merge(graphdef, state, copy=True)
        m.decoder.conv_out.kernel[...] = w
        return jnp.sum(m.decode(z) * ct)

    np.testing.assert_allclose(vjp(ct), jax.grad(direct)(vae.decoder.conv_out.kernel[...]), rtol=1e-5, atol=1e-6)


def _gen_inputs():
    vae, lp = ToyVAE(0), ToyLPIPS(1)
    d = NLayerDiscriminator(ndf=4, n_layers=1, rngs=nnx.Rngs(2))
    x, _ = _images(4, (2, 16, 16, 3))
    post = vae.encode(x)
    recon, vjp = ae.decode_with_last_layer(vae, post.mean)
    return x, recon, vjp, post, lp, d


def test_disc_start_switches_the_gan_term_off_but_keeps_d_weight():
    x, recon, vjp, post, lp, d = _gen_inputs()
    cfg = ae.LossConfig(disc_start=3)
    total, terms = ae.generator_loss(x, recon, vjp, post, lp, d, 2, cfg)
    assert float(terms["disc_factor"]) == 0.0 and float(terms["d_weight"]) > 0.0
    np.testing.assert_allclose(total, terms["nll"] + cfg.kl_weight * terms["kl"], rtol=1e-6)
    total_on, terms_on = ae.generator_loss(x, recon, vjp, post, lp, d, 3, cfg)
    want = terms_on["nll"] + cfg.kl_weight * terms_on["kl"] + terms_on["d_weight"] * terms_on["g_loss"]
    np.testing.assert_allclose(total_on, want, rtol=1e-6)
    assert float(ae.discriminator_loss(d, x, recon, 2, cfg)[0]) == 0.0
    assert float(ae.discriminator_loss(d, x, recon, 3, cfg)[0]) > 0.0
    _, off = ae.generator_loss(x, recon, vjp, post, lp, d, 3, ae.LossConfig(disc_factor=0.0))
    assert float(off["d_weight"]) == 0.0  # the reference's static `if self.disc_factor > 0`


def test_lpips_dropout_key_reaches_the_perceptual_net():
    x, recon, vjp, post, lp, d = _gen_inputs()
    cfg = ae.LossConfig()
    _, plain = ae.generator_loss(x, recon, vjp, post, lp, d, 0, cfg)
    key = jax.random.key(0)
    _, dropped = ae.generator_loss(x, recon, vjp, post, lp, d, 0, cfg, lpips_key=key)
    np.testing.assert_allclose(plain["lpips"], jnp.mean(lp(x, recon)), rtol=1e-6)
    np.testing.assert_allclose(dropped["lpips"], jnp.mean(lp(x, recon, dropout_key=key)), rtol=1e-6)
    assert abs(float(plain["lpips"]) - float(dropped["lpips"])) > 1e-6


def test_generator_call_updates_discriminator_batch_stats():
    x, recon, vjp, post, lp, d = _gen_inputs()
    before = np.asarray(d.norms[0].mean[...]).copy()
    ae.generator_loss(x, recon, vjp, post, lp, d, 0, ae.LossConfig())
    assert not np.allclose(before, d.norms[0].mean[...])  # one train-mode D call on the fake batch


def test_loss_config_from_config_dict():
    section = default_config(ae.LossConfig)
    assert parse(ae.LossConfig, section) == ae.LossConfig()
    section.disc_start = 50001
    assert parse(ae.LossConfig, section).disc_start == 50001
    with pytest.raises(ValueError, match="unknown"):
        parse(ae.LossConfig, {"disc_weight": 0.5, "pixelloss_weight": 1.0})
    with pytest.raises(ValueError):
        ae.LossConfig(reduction="avg")


def test_with_gradient_takes_the_given_gradient_and_stops_the_rest():
    x = jnp.asarray([1.0, 2.0, 3.0])

    def f(x, scale):
        value = jnp.sum(scale * x**2)  # d value / d x = 2 * scale * x
        grad = jax.grad(lambda x: jnp.sum(scale * x**2))(x)
        return ae.with_gradient(value, x, grad)

    np.testing.assert_allclose(f(x, 3.0), 42.0)
    np.testing.assert_allclose(jax.grad(f)(x, 3.0), 6.0 * x)  # the same as plain autodiff of `value`
    assert float(jax.grad(f, argnums=1)(x, 3.0)) == 0.0  # nothing flows into what made value and grad
    # 2 * f: the cotangent scales the given gradient
    np.testing.assert_allclose(jax.grad(lambda x: 2.0 * f(x, 3.0))(x), 12.0 * x)
