"""The full SD-VAE (f8c4, 83.7M parameters) at 32x32 against two independent PyTorch implementations:
the LDM autoencoder from taming's Encoder/Decoder and diffusers' AutoencoderKL holding the same weights
(moved by diffusers' own LDM converter). Also: the LDM and diffusers key maps give identical Flax weights."""

import kl_vae_refs as refs
import numpy as np
import pytest

from eqvae_jax.convert import kl_vae_keys as keys
from eqvae_jax.models import kl_vae, weights

TOL = 1e-4


@pytest.fixture(scope="module")
def full():
    cfg = kl_vae.sd_vae()
    ldm = refs.random_ldm(cfg, seed=7)
    diff = refs.diffusers_from_ldm(ldm, cfg)
    flat_ldm = keys.torch_to_flax(refs.numpy_state_dict(ldm), cfg, "ldm")
    flat_diff = keys.torch_to_flax(refs.numpy_state_dict(diff), cfg, "diffusers")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return dict(cfg=cfg, ldm=ldm, diff=diff, flat_ldm=flat_ldm, flat_diff=flat_diff, x=x,
                ref_diff=refs.diffusers_outputs(diff, x_nchw), ref_ldm=refs.ldm_outputs(ldm, x_nchw))


def test_ldm_and_diffusers_layouts_give_identical_flax_weights(full):
    a, b = full["flat_ldm"], full["flat_diff"]
    assert a.keys() == b.keys() and len(a) == 248
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_references_agree(full):
    errors = [refs.max_err(a, b) for a, b in zip(full["ref_ldm"], full["ref_diff"], strict=True)]
    assert max(errors) <= TOL, errors


def test_full_sd_vae_parity(full):
    vae = kl_vae.abstract(full["cfg"])
    weights.assign_variables(vae, full["flat_diff"])
    mean_ref = full["ref_diff"][0]
    got = refs.jax_outputs(vae, full["x"], mean_ref)
    for name in ("ref_diff", "ref_ldm"):
        errors = [refs.max_err(a, b) for a, b in zip(got, full[name], strict=True)]
        print(f"full SD-VAE vs {name}: max abs err mean/logvar/decode = {errors}")
        assert max(errors) <= TOL, (name, errors)
    assert got[2].shape == (2, 32, 32, 3) and got[0].shape == (2, 4, 4, 4)
