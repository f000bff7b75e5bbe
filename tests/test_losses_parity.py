"""Loss-level parity with a PyTorch computation of the reference formulas (LDM contperceptual + eqvae forward).

Toy autoencoder / perceptual net (tests/toys.py) and the real PatchGAN (taming's NLayerDiscriminator on the
torch side), the same weights, inputs and posterior noise on both sides; every branch of the transform,
including an anisotropic odd rotation. Our side is the job's own `generator_grads` / `discriminator_grads`
(train/eqvae/steps.py). Compared: every loss term, the adaptive weight, the (target, reconstruction) pair, and
the gradients of the generator total (VAE) and of the D loss (D).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from contperceptual_reference import LPIPSWithDiscriminator, transformed_forward
from flax import nnx
from taming.modules.discriminator.model import NLayerDiscriminator as TamingD
from toys import TorchToyLPIPS, TorchToyVAE, ToyLPIPS, ToyVAE, production_steps

from eqvae_jax.convert.discriminator import torch_state_dict
from eqvae_jax.losses.autoencoder import LossConfig
from eqvae_jax.losses.equivariance import Branch, Draw
from eqvae_jax.models.discriminator import NLayerDiscriminator
from eqvae_jax.models.weights import flat_variables

RTOL = 2e-5
CFG = LossConfig(lpips_dropout=False)  # dropout streams differ between frameworks; the switch is tested apart
D_LAYERS = 1

CASES = {
    "plain": Draw(Branch.PLAIN, (32, 32), 32),
    "lowres_20": Draw(Branch.LOWRES, (20, 20), 32),
    "equivariance_9_rot1": Draw(Branch.EQUIVARIANCE, (9, 9), 32, 1),
    "equivariance_24_rot3": Draw(Branch.EQUIVARIANCE, (24, 24), 32, 3),
    "anisotropic_12x20_rot1": Draw(Branch.EQUIVARIANCE, (12, 20), 32, 1),
}


def _disc_pair(seed: int, gain: float) -> tuple[NLayerDiscriminator, TamingD]:
    d = NLayerDiscriminator(ndf=4, n_layers=D_LAYERS, rngs=nnx.Rngs(seed))
    d.convs[-1].kernel[...] = d.convs[-1].kernel[...] * gain  # larger logits: adaptive weight stays unclipped
    t = TamingD(input_nc=3, ndf=4, n_layers=D_LAYERS).train()
    sd = torch_state_dict(flat_variables(d), D_LAYERS)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return d, t


@pytest.fixture(scope="module")
def setup():
    vae, lp = ToyVAE(0), ToyLPIPS(1)
    d, td = _disc_pair(2, gain=300.0)
    _, state, lpips_state, g_grads, d_grads = production_steps(vae, lp, d, CFG)
    return dict(vae=vae, lp=lp, d=d, td=td, g_grads=g_grads, d_grads=d_grads, state=state, lpips_state=lpips_state)


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _torch_reference(s, x: np.ndarray, draw: Draw, noise_key: jax.Array, step: int):
    tvae = TorchToyVAE(s["vae"])
    td = TamingD(input_nc=3, ndf=4, n_layers=D_LAYERS).train()
    td.load_state_dict(s["td"].state_dict())
    loss_mod = LPIPSWithDiscriminator(
        TorchToyLPIPS(s["lp"]), td, disc_start=CFG.disc_start, kl_weight=CFG.kl_weight, disc_weight=CFG.disc_weight
    )
    den = draw.denominator
    scale = draw.scale[0] / den if draw.scale[0] == draw.scale[1] else (draw.scale[0] / den, draw.scale[1] / den)
    xt = _nchw(x)
    mean_shape = tvae.encode(
        torch.nn.functional.interpolate(xt, scale_factor=scale, mode="bilinear", align_corners=False)
        if draw.branch is Branch.LOWRES
        else xt
    ).shape
    b, c2, h, w = mean_shape
    noise = jax.random.normal(noise_key, (b, h, w, c2 // 2))  # what DiagonalGaussian.sample(key) draws
    target, recon, post = transformed_forward(
        tvae.encode, tvae.decode, xt, _nchw(noise), draw.branch.value, scale, draw.rot_k
    )
    loss, log = loss_mod(target, recon, post, 0, step, last_layer=tvae.decoder.conv_out.weight)
    loss.backward()
    d_loss, dlog = loss_mod(target.detach(), recon.detach(), post, 1, step)
    td.zero_grad()
    d_loss.backward()
    grads = {
        "encoder": tvae.encoder.weight.grad,
        "conv_out": tvae.decoder.conv_out.weight.grad,
        "d_last": td.main[-1].weight.grad,
    }
    return _nhwc(target), _nhwc(recon), log, dlog, {k: v.numpy() for k, v in grads.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_generator_and_discriminator_losses_match_reference(setup, name):
    draw = CASES[name]
    x = np.random.default_rng(3).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    key, step = jax.random.key(11), 0  # the first micro-step; GAN from step 0 (disc_start 0)
    state = setup["state"]
    plan, rot_k = draw.plan((64, 64))
    grads, terms, (target, recon), new_stats = setup["g_grads"](
        state, setup["lpips_state"], jnp.asarray(x), rot_k, key, plan
    )
    after_g = state.replace(step=state.step + 1, disc_stats=new_stats)  # what the generator step hands on
    d_grads, d_terms, _ = setup["d_grads"](after_g, jnp.asarray(x), rot_k, key, (target, recon), plan)

    noise_key = jax.random.split(key)[0]  # transformed_generator_loss: (sample key, lpips key)
    t_target, t_recon, log, dlog, t_grads = _torch_reference(setup, x, draw, noise_key, step)

    errors = {"target": _rel(target, t_target), "recon": _rel(recon, t_recon)}
    for k in ("total", "nll", "kl", "g_loss", "d_weight", "rec_loss", "disc_factor"):
        errors[k] = _rel(terms[k], log[k].numpy())
    for k in ("disc_loss", "logits_real", "logits_fake"):
        errors[k] = _rel(d_terms[k], dlog[k].numpy())
    errors["grad_encoder"] = _rel(grads["encoder"]["kernel"][...], t_grads["encoder"].transpose(2, 3, 1, 0))
    errors["grad_conv_out"] = _rel(
        grads["decoder"]["conv_out"]["kernel"][...], t_grads["conv_out"].transpose(2, 3, 1, 0)
    )
    errors["grad_d_last"] = _rel(d_grads["convs"][D_LAYERS + 1]["kernel"][...], t_grads["d_last"].transpose(2, 3, 1, 0))
    print(
        f"{name}: d_weight {float(terms['d_weight']):.4g}, total {float(terms['total']):.6g}; rel errors",
        {k: f"{v:.1e}" for k, v in errors.items()},
    )
    assert target.shape == t_target.shape == recon.shape
    assert 0.0 < float(terms["d_weight"]) < 0.5 * CFG.adaptive_max  # not clipped: the ratio itself is compared
    assert np.abs(grads["encoder"]["kernel"][...]).max() > 0  # gradients reach the encoder in every branch
    assert max(errors.values()) <= RTOL, errors
