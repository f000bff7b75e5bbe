"""EQ-VQGAN's device-side pieces on the tiny VQ-VAE: the transform acts on the pre-quantization latents (then
quantize, then decode) through the branch logic shared with the KL-VAE, and the VQ equivariance metric (latent
error on pre-quantization features, fraction of code indices that commute with rotations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eqvae_jax.eval import equivariance as eq_eval
from eqvae_jax.losses import equivariance as eq
from eqvae_jax.losses import resample
from eqvae_jax.models import kl_vae, vq_vae


@pytest.fixture(scope="module")
def model():
    return vq_vae.build(vq_vae.tiny(), seed=1)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)


@pytest.fixture(scope="module")
def fns(model):
    """Jitted pieces of the tiny model (eager calls compile op by op, slower on a loaded CPU)."""
    graphdef, state = nnx.split(model)
    m = lambda: nnx.merge(graphdef, state)
    return dict(
        latents=jax.jit(lambda x: m().encode_latents(x)),
        quantize=jax.jit(lambda z: m().quantize(z)),
        decode_indices=jax.jit(lambda i: m().decode_indices(i)),
        transformed=jax.jit(lambda x, plan, k: eq.reconstruct_transformed_vq(m(), x, plan, k), static_argnums=1),
    )


def test_transform_acts_on_latents_before_quantization(fns, images):
    latents = fns["latents"](images)
    # rotation alone: the codes of the rotated latents are the rotated codes, nothing is re-quantized differently
    plan, rot_k = eq.Draw(eq.Branch.EQUIVARIANCE, (32, 32), 32, 1).plan((32, 32))
    target, recon, enc = fns["transformed"](images, plan, rot_k)
    np.testing.assert_array_equal(enc.indices, np.rot90(fns["quantize"](latents).indices, 1, axes=(2, 1)))
    np.testing.assert_array_equal(target, resample.rot90(images, 1))
    # scale + rotation: the decoder sees codebook vectors of the transformed latents (quantized after the
    # transform), not transformed codebook vectors
    plan, rot_k = eq.Draw(eq.Branch.EQUIVARIANCE, (20, 20), 32, 3).plan((32, 32))
    target, recon, enc = fns["transformed"](images, plan, rot_k)
    want_latents = resample.rot90(resample.resize(latents, (20, 20), 32), 3)
    np.testing.assert_allclose(enc.latents, want_latents, rtol=1e-6, atol=1e-6)
    assert recon.shape == target.shape == (2, 20, 20, 3) and enc.indices.shape == (2, 10, 10)
    np.testing.assert_allclose(recon, fns["decode_indices"](enc.indices), atol=1e-5)
    np.testing.assert_allclose(enc.codebook_loss, fns["quantize"](want_latents).codebook_loss, rtol=1e-5)


def test_kl_vae_goes_through_the_same_branch_logic():
    vae = kl_vae.build(kl_vae.tiny(), seed=0)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    key = jax.random.key(3)
    plan, rot_k = eq.Draw(eq.Branch.EQUIVARIANCE, (24, 24), 32, 2).plan((16, 16))

    @jax.jit
    def run(x):
        target, z, posterior = eq.encode_transformed(vae, x, plan, rot_k, key)
        want = resample.rot90(resample.resize(vae.encode(x).sample(key), (24, 24), 32), 2)
        return z, want, posterior.mean, vae.encode(x).mean

    z, want, mean, want_mean = run(x)
    np.testing.assert_allclose(z, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mean, want_mean)


class EquivariantVQ(nnx.Module):
    """2x2 average pool, a 1x1 channel map and a quantizer: exactly equivariant to quarter turns."""

    def __init__(self):
        self.proj = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        self.quantize = vq_vae.VectorQuantizer(8, 4, rngs=nnx.Rngs(1))
        self.quantize.embedding[...] = jax.random.normal(jax.random.key(2), (8, 4))

    def encode(self, x):
        b, h, w, c = x.shape
        return self.quantize(self.proj(x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))))


def vq_metrics(vq, images):
    """The production metric, jitted as an eval step runs it."""
    graphdef, state = nnx.split(vq)
    return jax.jit(lambda s, x: eq_eval.vq_equivariance(nnx.merge(graphdef, s), x))(state, images)


def test_vq_metric_on_an_equivariant_and_a_generic_encoder(model, fns, images):
    exact = vq_metrics(EquivariantVQ(), images)
    assert {f"codes/rot{a}" for a in (90, 180, 270)} <= set(exact)
    for a in (90, 180, 270):
        np.testing.assert_array_equal(exact[f"codes/rot{a}"], np.ones(2, np.float32))
        assert float(jnp.max(exact[f"rot{a}"])) < 1e-10
    got = vq_metrics(model, images)
    # the definitions, recomputed from the latents of the images and of their rotations (one batch)
    rotated = jnp.concatenate([images, *(resample.rot90(images, k) for k in (1, 2, 3))])
    latents = np.asarray(fns["latents"](rotated)).reshape(4, *images.shape[:1], 16, 16, -1)
    codes = lambda z: np.asarray(fns["quantize"](jnp.asarray(z)).indices)
    for k in (1, 2, 3):
        tau_e, e_tau = np.rot90(latents[0], k, axes=(2, 1)), latents[k]
        err = np.sum((tau_e - e_tau) ** 2, axis=(1, 2, 3)) / np.sum(e_tau**2, axis=(1, 2, 3))
        np.testing.assert_allclose(got[f"rot{90 * k}"], err, rtol=1e-4)  # on pre-quantization features
        agree = (codes(tau_e) == codes(e_tau)).mean(axis=(1, 2))
        np.testing.assert_allclose(got[f"codes/rot{90 * k}"], agree, rtol=1e-6)
    assert 0.0 < float(jnp.mean(got["codes/rot90"])) < 1.0  # a random model's codes do not all commute
    result = eq_eval.with_families({f"equivariance/{k}": float(np.mean(v)) for k, v in got.items()},
                                   prefix="equivariance/")
    print({k: round(v, 4) for k, v in result.items()})
    codes = [result[f"equivariance/codes/rot{a}"] for a in (90, 180, 270)]
    assert result["equivariance/codes/rotation"] == pytest.approx(np.mean(codes))
    assert {"equivariance/rotation", "equivariance/scale", "equivariance/scale0.5"} <= set(result)
