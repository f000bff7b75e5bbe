"""The objective with the real models: tiny KL-VAE (vs taming's LDM Encoder/Decoder), LPIPS (vs the `lpips`
package, random VGG) and the PatchGAN (vs taming's NLayerDiscriminator), same weights on both sides, one
equivariance step (scale 24/32, one quarter turn) through the job's own `generator_grads` /
`discriminator_grads` (train/eqvae/steps.py)."""

import jax
import jax.numpy as jnp
import kl_vae_refs
import numpy as np
import pytest
import torch
from contperceptual_reference import LPIPSWithDiscriminator, transformed_forward
from flax import nnx
from taming.modules.discriminator.model import NLayerDiscriminator as TamingD
from toys import production_steps

from eqvae_jax.convert import discriminator as disc_convert
from eqvae_jax.convert import kl_vae_keys
from eqvae_jax.convert import lpips as lpips_convert
from eqvae_jax.losses.autoencoder import LossConfig
from eqvae_jax.losses.equivariance import Branch, Draw
from eqvae_jax.models import kl_vae, lpips, weights
from eqvae_jax.models.discriminator import NLayerDiscriminator

CFG = LossConfig(lpips_dropout=False)
D_LAYERS = 2
RTOL = 1e-4


@pytest.fixture(scope="module")
def models():
    import torchvision_shim

    torchvision_shim.install()
    import lpips as lpips_ref

    vae_cfg = kl_vae.tiny()
    t_vae = kl_vae_refs.random_ldm(vae_cfg, seed=0)
    vae = kl_vae.abstract(vae_cfg)
    weights.assign_variables(vae, kl_vae_keys.torch_to_flax(kl_vae_refs.numpy_state_dict(t_vae), vae_cfg, "ldm"))

    torch.manual_seed(1)
    t_lpips = lpips_ref.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    lp = lpips.abstract()
    flat, _ = lpips_convert.flax_variables({k: v.numpy() for k, v in t_lpips.state_dict().items()})
    weights.assign_variables(lp, flat)

    d = NLayerDiscriminator(ndf=8, n_layers=D_LAYERS, rngs=nnx.Rngs(2))
    d.convs[-1].kernel[...] = d.convs[-1].kernel[...] * 30.0  # larger logits: adaptive weight stays unclipped
    t_d = TamingD(input_nc=3, ndf=8, n_layers=D_LAYERS).train()
    sd = disc_convert.torch_state_dict(weights.flat_variables(d), D_LAYERS)
    t_d.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return vae, lp, d, t_vae, t_lpips, t_d


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_equivariance_step_with_real_models_matches_reference(models):
    vae, lp, d, t_vae, t_lpips, t_d = models
    _, state, lpips_state, g_grads, d_grads = production_steps(vae, lp, d, CFG)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    draw = Draw(Branch.EQUIVARIANCE, (24, 24), 32, 1)
    plan, rot_k = draw.plan((64, 64))
    key, step = jax.random.key(3), 0
    grads, terms, (target, recon), new_stats = g_grads(state, lpips_state, jnp.asarray(x), rot_k, key, plan)
    after_g = state.replace(step=state.step + 1, disc_stats=new_stats)
    _, d_terms, _ = d_grads(after_g, jnp.asarray(x), rot_k, key, (target, recon), plan)

    noise = jax.random.normal(jax.random.split(key)[0], (2, 32, 32, 4))
    loss_mod = LPIPSWithDiscriminator(
        t_lpips, t_d, disc_start=CFG.disc_start, kl_weight=CFG.kl_weight, disc_weight=CFG.disc_weight
    )
    t_target, t_recon, post = transformed_forward(
        lambda a: torch.cat(t_vae.encode(a), dim=1), t_vae.decode, _nchw(x), _nchw(noise), "equivariance", 0.75, 1
    )
    loss, log = loss_mod(t_target, t_recon, post, 0, step, last_layer=t_vae.decoder.conv_out.weight)
    loss.backward()
    d_loss, dlog = loss_mod(t_target.detach(), t_recon.detach(), post, 1, step)

    errors = {"recon": _rel(recon, t_recon.detach().numpy().transpose(0, 2, 3, 1))}
    errors.update({k: _rel(terms[k], log[k].numpy()) for k in ("total", "nll", "kl", "g_loss", "d_weight")})
    errors.update({k: _rel(d_terms[k], dlog[k].numpy()) for k in ("disc_loss", "logits_real", "logits_fake")})
    t_grad = t_vae.encoder.conv_in.weight.grad.numpy().transpose(2, 3, 1, 0)
    errors["grad_encoder_conv_in"] = _rel(grads["encoder"]["conv_in"]["kernel"][...], t_grad)
    shown = {k: f"{v:.1e}" for k, v in errors.items()}
    print(f"real models: d_weight {float(terms['d_weight']):.4g}; rel errors", shown)
    assert target.shape == (2, 48, 48, 3)
    assert 0.0 < float(terms["d_weight"]) < 0.5 * CFG.adaptive_max
    assert max(errors.values()) <= RTOL, errors
