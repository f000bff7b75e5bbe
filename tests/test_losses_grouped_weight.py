"""The adaptive GAN weight per group, against the reference's DDP semantics.

The reference trains on 8 GPUs x 10 images with DDP: each GPU runs the LDM loss on its own 10 images (its own
discriminator BatchNorm statistics, its own `torch.autograd.grad` adaptive weight) and DDP averages the
gradients. Torch side here: exactly that, the LDM loss (torch_refs/contperceptual_reference.py) run on each
10-image group separately, gradients averaged. Our side: the job's own `generator_grads` /
`discriminator_grads` (train/eqvae/steps.py, built by `make_spec`) on 8 fake devices with the batch of 80 sharded
over the mesh, D's statistics in 8 groups and `loss.adaptive_weight_groups=0` (= those groups). Toy autoencoder
and perceptual net, the real PatchGAN (taming's NLayerDiscriminator on the torch side), 16 px images.

Also: the other path of `grouped_adaptive_weight` (groups finer than D's statistics groups: one D backward per
group) against a torch computation of the same objective, and both paths agreeing where both apply.
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
from eqvae_jax.losses import autoencoder
from eqvae_jax.losses.autoencoder import LossConfig
from eqvae_jax.losses.equivariance import Branch, Draw
from eqvae_jax.losses.nnx_vjp import vjp_wrt_input, vjp_wrt_variable
from eqvae_jax.models.discriminator import NLayerDiscriminator
from eqvae_jax.models.weights import flat_variables
from eqvae_jax.parallel.mesh import batch_sharding, make_mesh, param_shardings, place

RTOL = 1e-5
GROUPS, PER_GROUP, SIZE = 8, 10, 16
CFG = LossConfig(lpips_dropout=False)  # dropout streams differ between frameworks
D_LAYERS = 1
LPIPS_CHANNELS = 32  # few channels make the toy LPIPS ill-conditioned in float32 (tests/toys.py)
CASES = {
    "plain": Draw(Branch.PLAIN, (32, 32), 32),
    "equivariance_24_rot3": Draw(Branch.EQUIVARIANCE, (24, 24), 32, 3),
}


def _disc_pair(stats_groups: int) -> tuple[NLayerDiscriminator, TamingD]:
    d = NLayerDiscriminator(ndf=4, n_layers=D_LAYERS, stats_groups=stats_groups, rngs=nnx.Rngs(2))
    d.convs[-1].kernel[...] = d.convs[-1].kernel[...] * 300.0  # larger logits: adaptive weights stay unclipped
    t = TamingD(input_nc=3, ndf=4, n_layers=D_LAYERS).train()
    sd = torch_state_dict(flat_variables(d), D_LAYERS)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return d, t


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def _hwio(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(2, 3, 1, 0)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _images() -> np.ndarray:
    return np.random.default_rng(3).uniform(-1, 1, (GROUPS * PER_GROUP, SIZE, SIZE, 3)).astype(np.float32)


def _noise(key: jax.Array, shape: tuple[int, ...]) -> torch.Tensor:
    """The posterior noise our step draws: transformed_generator_loss splits key into (sample, LPIPS) keys."""
    return _nchw(jax.random.normal(jax.random.split(key)[0], shape))


def _scale(draw: Draw) -> float:
    return draw.scale[0] / draw.denominator


@pytest.fixture(scope="module")
def ddp():
    """Our production grads on the 8-device mesh (D statistics and adaptive weights per 10 images)."""
    vae, lp = ToyVAE(0), ToyLPIPS(1, channels=LPIPS_CHANNELS)
    d, td = _disc_pair(stats_groups=GROUPS)
    spec, state, lpips_state, g_grads, d_grads = production_steps(vae, lp, d, CFG)
    assert spec.loss.adaptive_weight_groups == GROUPS  # 0 resolved to D's statistics groups
    mesh = make_mesh(-1, 1)
    assert mesh.devices.size == GROUPS  # one group of 10 per device, as one GPU of the reference
    state = place(state, param_shardings(state, mesh))
    images = jax.device_put(_images(), batch_sharding(mesh))
    return dict(vae=vae, lp=lp, td=td, state=state, lpips_state=lpips_state, g_grads=g_grads, d_grads=d_grads,
                images=images)


def _torch_ddp(s, x: np.ndarray, draw: Draw, key: jax.Array, latent_shape: tuple[int, ...]):
    """Each 10-image group through the LDM loss on its own (G step, then D step), gradients averaged."""
    tvae, td = TorchToyVAE(s["vae"]), s["td"]
    loss_mod = LPIPSWithDiscriminator(TorchToyLPIPS(s["lp"]), td, disc_start=CFG.disc_start,
                                      kl_weight=CFG.kl_weight, disc_weight=CFG.disc_weight)
    noise = _noise(key, latent_shape)
    d_params = {"d_first": td.main[0].weight, "d_last": td.main[-1].weight}
    d_grads = {k: torch.zeros_like(v) for k, v in d_params.items()}
    weights, d_losses = [], []
    for g in range(GROUPS):
        rows = slice(g * PER_GROUP, (g + 1) * PER_GROUP)
        target, recon, post = transformed_forward(tvae.encode, tvae.decode, _nchw(x[rows]), noise[rows],
                                                  draw.branch.value, _scale(draw), draw.rot_k)
        td.requires_grad_(False)  # the G step does not train D (Lightning toggles requires_grad per optimizer)
        loss, log = loss_mod(target, recon, post, 0, 0, last_layer=tvae.decoder.conv_out.weight)
        (loss / GROUPS).backward()  # DDP: the mean of the per-GPU gradients
        td.requires_grad_(True)
        d_loss, dlog = loss_mod(target.detach(), recon.detach(), post, 1, 0)
        for k, v in zip(d_params, torch.autograd.grad(d_loss / GROUPS, list(d_params.values())), strict=True):
            d_grads[k] += v
        weights.append(float(log["d_weight"]))
        d_losses.append(float(dlog["disc_loss"]))
    grads = {"encoder": tvae.encoder.weight.grad, "conv_in": tvae.decoder.conv_in.weight.grad,
             "conv_out": tvae.decoder.conv_out.weight.grad, **d_grads}
    return np.array(weights), float(np.mean(d_losses)), {k: _hwio(v) for k, v in grads.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_group_weights_and_gradients_match_ddp_reference(ddp, name):
    draw = CASES[name]
    plan, rot_k = draw.plan((SIZE, SIZE))
    key = jax.random.key(11)
    state = ddp["state"]
    grads, terms, pair, stats = ddp["g_grads"](state, ddp["lpips_state"], ddp["images"], rot_k, key, plan)
    after_g = state.replace(step=state.step + 1, disc_stats=stats)
    d_grads, d_terms, _ = ddp["d_grads"](after_g, ddp["images"], rot_k, key, pair, plan)

    latent_shape = (GROUPS * PER_GROUP, SIZE // 2, SIZE // 2, 2)  # the toy VAE: f=2, 2 latent channels
    t_weights, t_d_loss, t_grads = _torch_ddp(ddp, np.asarray(ddp["images"]), draw, key, latent_shape)
    weights = np.asarray(terms["d_weight_groups"])
    errors = {"d_weight_groups": _rel(weights, t_weights), "disc_loss": _rel(d_terms["disc_loss"], t_d_loss),
              "grad_encoder": _rel(grads["encoder"]["kernel"][...], t_grads["encoder"]),
              "grad_decoder_conv_in": _rel(grads["decoder"]["conv_in"]["kernel"][...], t_grads["conv_in"]),
              "grad_decoder_conv_out": _rel(grads["decoder"]["conv_out"]["kernel"][...], t_grads["conv_out"]),
              "grad_d_first": _rel(d_grads["convs"][0]["kernel"][...], t_grads["d_first"]),
              "grad_d_last": _rel(d_grads["convs"][D_LAYERS + 1]["kernel"][...], t_grads["d_last"])}
    print(f"{name}: per-group d_weight {np.round(weights, 4).tolist()}; rel errors",
          {k: f"{v:.1e}" for k, v in errors.items()})
    assert weights.shape == (GROUPS,) and np.all(weights > 0) and np.all(weights < 0.5 * CFG.adaptive_max)
    assert np.ptp(weights) > 1e-3 * np.mean(weights)  # the groups really differ: the test can tell them apart
    assert float(terms["d_weight"]) == pytest.approx(np.mean(weights), rel=1e-6)
    assert (float(terms["d_weight_min"]), float(terms["d_weight_max"])) == (weights.min(), weights.max())
    assert max(errors.values()) <= RTOL, errors


def _our_grouped_weights(d: NLayerDiscriminator, vae: ToyVAE, lp: ToyLPIPS, x: jax.Array, noise_key: jax.Array,
                         groups: int, disc_stats_groups: int | None) -> tuple[jax.Array, jax.Array]:
    """grouped_adaptive_weight on a plain reconstruction, with the path chosen by `disc_stats_groups`: (weights,
    each group's GAN-loss gradient w.r.t. the reconstruction)."""
    posterior = vae.encode(x)
    recon, last_layer_vjp = vjp_wrt_variable(vae, autoencoder.DECODER_LAST_LAYER,
                                             lambda m: m.decode(posterior.sample(noise_key)))
    _, nll_vjp = jax.vjp(lambda r: jnp.sum(jnp.abs(x - r) + 3 * lp(x, r).reshape(-1, 1, 1, 1)) / x.shape[0], recon)
    logits, disc_vjp = vjp_wrt_input(nnx.clone(d), recon)
    return autoencoder.grouped_adaptive_weight(nll_vjp(jnp.float32(1.0))[0], logits, disc_vjp, last_layer_vjp,
                                               groups, disc_stats_groups, CFG)


def test_both_paths_agree_where_both_apply():
    """D statistics per 10 images and 4 adaptive groups of 20: the shared D backward (block-diagonal) and one D
    backward per group give the same weights and the same per-group GAN gradients."""
    vae, lp = ToyVAE(0), ToyLPIPS(1, channels=LPIPS_CHANNELS)
    d, _ = _disc_pair(stats_groups=8)
    x = jnp.asarray(_images())
    key = jax.random.key(5)
    shared = _our_grouped_weights(d, vae, lp, x, key, 4, disc_stats_groups=8)
    separate = _our_grouped_weights(d, vae, lp, x, key, 4, disc_stats_groups=None)
    assert shared[0].shape == (4,) and shared[1].shape == (4, *x.shape)
    np.testing.assert_allclose(shared[0], separate[0], rtol=1e-6)
    np.testing.assert_allclose(shared[1], separate[1], rtol=1e-5, atol=1e-6 * float(jnp.abs(separate[1]).max()))


def test_groups_finer_than_d_statistics_match_torch():
    """D statistics over the whole batch of 80, 8 adaptive groups: group g's GAN loss is the mean of its logits
    from the one whole-batch D forward; its weight from its own nll and GAN gradients; the objective is the
    mean over groups. Torch computes exactly that with autograd.grad per group."""
    vae, lp = ToyVAE(0), ToyLPIPS(1, channels=LPIPS_CHANNELS)
    d, td = _disc_pair(stats_groups=1)
    cfg = LossConfig(lpips_dropout=False, adaptive_weight_groups=GROUPS)
    _, state, lpips_state, g_grads, _ = production_steps(vae, lp, d, cfg)
    x = _images()
    plan, rot_k = CASES["plain"].plan((SIZE, SIZE))
    key = jax.random.key(7)
    grads, terms, _, _ = g_grads(state, lpips_state, jnp.asarray(x), rot_k, key, plan)

    tvae = TorchToyVAE(vae)
    loss_mod = LPIPSWithDiscriminator(TorchToyLPIPS(lp), td, disc_start=0, kl_weight=cfg.kl_weight,
                                      disc_weight=cfg.disc_weight)
    target, recon, post = transformed_forward(tvae.encode, tvae.decode, _nchw(x),
                                              _noise(key, (80, SIZE // 2, SIZE // 2, 2)), "plain")
    logits = td(recon)  # whole-batch BatchNorm statistics
    rec = torch.abs(target - recon) + loss_mod.perceptual_weight * loss_mod.perceptual_loss(target, recon)
    kl = post.kl()
    total, weights = 0.0, []
    for g in range(GROUPS):
        rows = slice(g * PER_GROUP, (g + 1) * PER_GROUP)
        nll_g = torch.sum(rec[rows]) / PER_GROUP
        g_g = -torch.mean(logits[rows])
        w = loss_mod.calculate_adaptive_weight(nll_g, g_g, last_layer=tvae.decoder.conv_out.weight)
        weights.append(float(w))
        total = total + (nll_g + cfg.kl_weight * torch.sum(kl[rows]) / PER_GROUP + w * g_g) / GROUPS
    total.backward()
    errors = {"d_weight_groups": _rel(terms["d_weight_groups"], weights),
              "grad_encoder": _rel(grads["encoder"]["kernel"][...], _hwio(tvae.encoder.weight.grad)),
              "grad_decoder_conv_out": _rel(grads["decoder"]["conv_out"]["kernel"][...],
                                            _hwio(tvae.decoder.conv_out.weight.grad))}
    print("groups finer than D statistics: rel errors", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= RTOL, errors
