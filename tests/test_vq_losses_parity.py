"""The VQGAN objective (losses.vq through losses.equivariance.transformed_vq_generator_loss) against a PyTorch
transcription of taming's VQLPIPSWithDiscriminator, on a toy VQ autoencoder (stride-2 conv encoder, the production
VectorQuantizer / taming's VectorQuantizer2, the toy decoder), the toy perceptual net and the real PatchGAN;
every branch of the EQ transform (on the pre-quantization latents). Compared: every loss term, d_weight, the
(target, reconstruction) pair, the code indices, and the gradients of the generator total w.r.t. encoder,
decoder and codebook, and of the D loss w.r.t. D."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from taming.modules.discriminator.model import NLayerDiscriminator as TamingD
from taming.modules.vqvae.quantize import VectorQuantizer2
from toys import LATENT, TorchToyDecoder, TorchToyLPIPS, ToyDecoder, ToyLPIPS, _conv, torch_conv
from vqperceptual_reference import VQLPIPSWithDiscriminator, transformed_vq_forward

from eqvae_jax.convert.discriminator import torch_state_dict
from eqvae_jax.losses import equivariance as eq
from eqvae_jax.losses import vq as vq_loss
from eqvae_jax.models.discriminator import NLayerDiscriminator
from eqvae_jax.models.vq_vae import VectorQuantizer
from eqvae_jax.models.weights import flat_variables
from eqvae_jax.typed_config import default_config, parse

RTOL = 1e-5
CFG = vq_loss.VQLossConfig(lpips_dropout=False)  # dropout streams differ between frameworks
D_LAYERS = 1
N_EMBED = 16

CASES = {
    "plain": eq.Draw(eq.Branch.PLAIN, (32, 32), 32),
    "lowres_20": eq.Draw(eq.Branch.LOWRES, (20, 20), 32),
    "equivariance_24_rot3": eq.Draw(eq.Branch.EQUIVARIANCE, (24, 24), 32, 3),
    "anisotropic_12x20_rot1": eq.Draw(eq.Branch.EQUIVARIANCE, (12, 20), 32, 1),
}


class ToyVQ(nnx.Module):
    """encoder: stride-2 conv -> LATENT-channel latents; VectorQuantizer; the toy decoder (f=2)."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.encoder = _conv(3, LATENT, 2, rngs)
        self.decoder = ToyDecoder(rngs)
        self.quantize = VectorQuantizer(N_EMBED, LATENT, rngs=rngs)
        # a codebook spread like the latents (a trained one), so no latent sits near a tie
        self.quantize.embedding[...] = jax.random.normal(jax.random.key(seed), (N_EMBED, LATENT)) * 0.5

    def transformable_latent(self, x, key=None):
        return self.encoder(x), None

    def decode(self, q):
        return self.decoder(q)


class TorchToyVQ(torch.nn.Module):
    def __init__(self, m: ToyVQ):
        super().__init__()
        self.encoder = torch_conv(m.encoder, stride=2)
        self.decoder = TorchToyDecoder(m.decoder)
        self.quantize = VectorQuantizer2(N_EMBED, LATENT, beta=0.25)
        with torch.no_grad():
            self.quantize.embedding.weight.copy_(torch.from_numpy(np.array(m.quantize.embedding[...])))


def make_vq_steps(vq, lpips, disc, cfg):
    """Jitted pure steps in the train-step pattern (as test_losses_toys.make_steps, for the VQ objective)."""
    vgd, vparams = nnx.split(vq)
    lgd, lstate = nnx.split(lpips)
    dgd, dparams, dstats = nnx.split(disc, nnx.Param, nnx.BatchStat)

    def g_step(vparams, dparams, dstats, x, plan, rot_k, key, step):
        def loss_fn(p):
            v = nnx.merge(vgd, p, copy=True)
            d = nnx.merge(dgd, dparams, dstats, copy=True)
            lp = nnx.merge(lgd, lstate, copy=True)
            total, terms, pair = eq.transformed_vq_generator_loss(v, lp, d, x, plan, rot_k, key, step, cfg)
            _, _, enc = eq.reconstruct_transformed_vq(v, x, plan, rot_k)
            return total, (terms, pair, enc.indices, nnx.state(d, nnx.BatchStat))

        (_, (terms, pair, idx, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(vparams)
        return terms, pair, idx, new_stats, grads

    def d_step(dparams, dstats, target, recon, step):
        def loss_fn(p):
            d = nnx.merge(dgd, p, dstats, copy=True)
            loss, terms = vq_loss.discriminator_loss(d, target, recon, step, cfg)
            return loss, (terms, nnx.state(d, nnx.BatchStat))

        (_, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(dparams)
        return terms, new_stats, grads

    return jax.jit(g_step, static_argnames=("plan",)), jax.jit(d_step), (vparams, dparams, dstats)


@pytest.fixture(scope="module")
def setup():
    vq, lp = ToyVQ(0), ToyLPIPS(1)
    d = NLayerDiscriminator(ndf=4, n_layers=D_LAYERS, rngs=nnx.Rngs(2))
    d.convs[-1].kernel[...] = d.convs[-1].kernel[...] * 30.0  # d_weight well inside (0, 1e4)
    td = TamingD(input_nc=3, ndf=4, n_layers=D_LAYERS).train()
    sd = torch_state_dict(flat_variables(d), D_LAYERS)
    td.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    g_step, d_step, states = make_vq_steps(vq, lp, d, CFG)
    return dict(vq=vq, lp=lp, td=td, g_step=g_step, d_step=d_step, states=states)


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _torch_reference(s, x: np.ndarray, draw: eq.Draw, step: int):
    tvq = TorchToyVQ(s["vq"])
    td = TamingD(input_nc=3, ndf=4, n_layers=D_LAYERS).train()
    td.load_state_dict(s["td"].state_dict())
    loss_mod = VQLPIPSWithDiscriminator(TorchToyLPIPS(s["lp"]), td, disc_start=CFG.disc_start,
                                        codebook_weight=CFG.codebook_weight, disc_weight=CFG.disc_weight)
    den = draw.denominator
    scale = draw.scale[0] / den if draw.scale[0] == draw.scale[1] else (draw.scale[0] / den, draw.scale[1] / den)
    captured = {}

    def quantize(h):
        out = tvq.quantize(h)
        captured["indices"] = out[2][2].reshape(h.shape[0], h.shape[2], h.shape[3]).numpy()
        return out

    target, recon, qloss = transformed_vq_forward(tvq.encoder, quantize, tvq.decoder, _nchw(x), draw.branch.value,
                                                  scale, draw.rot_k)
    loss, log = loss_mod(qloss, target, recon, 0, step, last_layer=tvq.decoder.conv_out.weight)
    loss.backward()
    d_loss, dlog = loss_mod(qloss, target.detach(), recon.detach(), 1, step)
    td.zero_grad()
    d_loss.backward()
    grads = {"encoder": tvq.encoder.weight.grad, "conv_out": tvq.decoder.conv_out.weight.grad,
             "codebook": tvq.quantize.embedding.weight.grad, "d_last": td.main[-1].weight.grad}
    return _nhwc(target), _nhwc(recon), captured["indices"], log, dlog, {k: v.numpy() for k, v in grads.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vq_generator_and_discriminator_losses_match_taming(setup, name):
    draw = CASES[name]
    x = np.random.default_rng(3).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    step = 5
    vparams, dparams, dstats = setup["states"]
    plan, rot_k = draw.plan((64, 64))
    terms, (target, recon), idx, new_stats, grads = setup["g_step"](
        vparams, dparams, dstats, jnp.asarray(x), plan, rot_k, jax.random.key(11), jnp.int32(step))
    d_terms, _, d_grads = setup["d_step"](dparams, new_stats, target, recon, jnp.int32(step))
    t_target, t_recon, t_idx, log, dlog, t_grads = _torch_reference(setup, x, draw, step)

    agreement = float(np.mean(np.asarray(idx) == t_idx))
    errors = {"target": _rel(target, t_target), "recon": _rel(recon, t_recon)}
    pairs = {"total": "total_loss", "nll": "nll_loss", "rec_loss": "rec_loss", "lpips": "p_loss",
             "codebook_loss": "quant_loss", "g_loss": "g_loss", "d_weight": "d_weight", "disc_factor": "disc_factor"}
    for ours, theirs in pairs.items():
        errors[ours] = _rel(terms[ours], log[theirs].numpy())
    for k in ("disc_loss", "logits_real", "logits_fake"):
        errors[k] = _rel(d_terms[k], dlog[k].numpy())
    conv_kernel = lambda t: t.transpose(2, 3, 1, 0)
    errors["grad_encoder"] = _rel(grads["encoder"]["kernel"][...], conv_kernel(t_grads["encoder"]))
    errors["grad_conv_out"] = _rel(grads["decoder"]["conv_out"]["kernel"][...], conv_kernel(t_grads["conv_out"]))
    errors["grad_codebook"] = _rel(grads["quantize"]["embedding"][...], t_grads["codebook"])
    errors["grad_d_last"] = _rel(d_grads["convs"][D_LAYERS + 1]["kernel"][...], conv_kernel(t_grads["d_last"]))
    print(f"{name}: d_weight {float(terms['d_weight']):.4g}, total {float(terms['total']):.6g}, index agreement "
          f"{agreement:.4f} ({idx.size} codes, {len(np.unique(t_idx))} distinct); rel errors",
          {k: f"{v:.1e}" for k, v in errors.items()})
    assert agreement == 1.0
    assert target.shape == t_target.shape == recon.shape
    assert 0.0 < float(terms["d_weight"]) < 0.5 * CFG.adaptive_max
    assert float(terms["codebook_usage"]) == pytest.approx(len(np.unique(t_idx)) / N_EMBED)
    assert np.abs(grads["encoder"]["kernel"][...]).max() > 0 and np.abs(grads["quantize"]["embedding"][...]).max() > 0
    assert max(errors.values()) <= RTOL, errors


def test_config_defaults_and_section():
    cfg = vq_loss.VQLossConfig()
    assert (cfg.disc_weight, cfg.codebook_weight, cfg.perceptual_weight, cfg.reduction) == (0.8, 1.0, 1.0, "mean")
    assert cfg.disc_start == 0 and cfg.logvar == 0.0 and cfg.disc_loss == "hinge"
    section = default_config(vq_loss.VQLossConfig)
    section.disc_start = 250001
    assert parse(vq_loss.VQLossConfig, section).disc_start == 250001
    with pytest.raises(ValueError, match="unknown"):
        parse(vq_loss.VQLossConfig, {"kl_weight": 1e-6})
    hash(cfg)


def test_disc_start_switches_the_gan_term_off(setup):
    vq, lp = setup["vq"], setup["lp"]
    d = NLayerDiscriminator(ndf=4, n_layers=D_LAYERS, rngs=nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    cfg = vq_loss.VQLossConfig(disc_start=10)
    plan, rot_k = eq.Draw(eq.Branch.PLAIN, (32, 32), 32).plan((32, 32))
    total, terms, _ = eq.transformed_vq_generator_loss(vq, lp, d, x, plan, rot_k, jax.random.key(0), 9, cfg)
    assert float(terms["disc_factor"]) == 0.0 and float(terms["d_weight"]) > 0.0
    np.testing.assert_allclose(total, terms["nll"] + terms["codebook_loss"], rtol=1e-6)
    total, terms, _ = eq.transformed_vq_generator_loss(vq, lp, d, x, plan, rot_k, jax.random.key(0), 10, cfg)
    want = terms["nll"] + terms["codebook_loss"] + terms["d_weight"] * terms["g_loss"]
    np.testing.assert_allclose(total, want, rtol=1e-6)
    np.testing.assert_allclose(terms["nll"], terms["rec_l1"] + terms["lpips"], rtol=1e-6)  # mean reduction
