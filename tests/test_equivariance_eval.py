"""Latent equivariance error: ~0 for an exactly rotation-equivariant encoder, not for a generic one, and the
same number as a PyTorch computation of the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toys import ConvEncoder, PointwiseEncoder, torch_conv

from eqvae_jax.eval.equivariance import EquivarianceEvalConfig, equivariance_errors, with_families


@pytest.fixture(scope="module")
def images() -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 64, 64, 3)), jnp.float32)


def _errors(encoder, images) -> dict:
    """The production metric (posterior mean as E), jitted as the eval step runs it."""
    return jax.jit(lambda x: equivariance_errors(lambda a: encoder.encode(a).mean, x))(images)


def _run(encoder, images) -> tuple[dict, dict]:
    errors = _errors(encoder, images[:2])
    rest = _errors(encoder, images[2:])
    means = {f"equivariance/{k}": float(np.mean(np.concatenate([errors[k], rest[k]]))) for k in errors}
    return errors, with_families(means, prefix="equivariance/")


def test_rotation_equivariant_encoder_has_zero_rotation_error(images):
    errors, result = _run(PointwiseEncoder(0), images)
    print(result)
    assert set(errors) == {"rot90", "rot180", "rot270", "scale0.25", "scale0.5", "scale0.75"}
    assert errors["rot90"].shape == (2,)
    assert result["equivariance/rotation"] < 1e-10
    assert result["equivariance/scale"] > 1e-4  # pooling + bilinear do not commute exactly


def test_generic_encoder_has_a_rotation_error(images):
    _, result = _run(ConvEncoder(1), images)
    print(result)
    assert result["equivariance/rotation"] > 1e-2
    rots = [result[f"equivariance/rot{a}"] for a in (90, 180, 270)]
    assert result["equivariance/rotation"] == pytest.approx(np.mean(rots))


def test_errors_match_a_torch_computation_of_the_formula(images):
    enc = ConvEncoder(2)
    errors = _errors(enc, images)
    conv = torch_conv(enc.conv, stride=2)
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())

    def mean_of(t):
        return torch.chunk(conv(t), 2, dim=1)[0]

    with torch.no_grad():
        for name, tau in {
            "rot90": lambda t: torch.rot90(t, 1, dims=[-1, -2]),
            "rot270": lambda t: torch.rot90(t, 3, dims=[-1, -2]),
            "scale0.75": lambda t: F.interpolate(t, scale_factor=0.75, mode="bilinear", align_corners=False),
        }.items():
            want_latent = mean_of(tau(x))
            err = ((tau(mean_of(x)) - want_latent) ** 2).sum(dim=[1, 2, 3]) / (want_latent**2).sum(dim=[1, 2, 3])
            np.testing.assert_allclose(errors[name], err.numpy(), rtol=1e-4)


def test_custom_transform_set():
    cfg = EquivarianceEvalConfig(rotations=(2,), scales=((1, 2),))
    assert list(cfg.transforms()) == ["rot180", "scale0.5"]
