"""PyTorch references for the KL-VAE tests: diffusers `AutoencoderKL` and the LDM autoencoder built from
taming's `Encoder/Decoder` (double_z=True, plus quant convs), with random weights and perturbed norms.

The two are independent implementations with independent key names; `diffusers_from_ldm` moves weights between
them with diffusers' own LDM->diffusers converter, so neither direction uses eqvae-jax's key map.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from taming.modules.diffusionmodules.model import Decoder, Encoder

from eqvae_jax.models.kl_vae import KLVAEConfig


def diffusers_kwargs(cfg: KLVAEConfig) -> dict:
    n = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor or None,
        use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
        mid_block_add_attention=cfg.mid_attention,
    )


@torch.no_grad()
def perturb_norms_(module: torch.nn.Module, seed: int) -> None:
    """GroupNorm affine params away from (1, 0), so a swapped weight/bias or a missed norm shows up."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def random_diffusers(cfg: KLVAEConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(**diffusers_kwargs(cfg)).eval()
    perturb_norms_(model, seed + 1)
    return model


class LDMAutoencoderKL(torch.nn.Module):
    """LDM `AutoencoderKL` (ldm/models/autoencoder.py) minus the loss: taming Encoder/Decoder, quant convs."""

    def __init__(self, cfg: KLVAEConfig):
        super().__init__()
        fixed = cfg.norm_num_groups == 32 and cfg.norm_eps == 1e-6 and cfg.mid_attention
        assert fixed, "taming fixes GroupNorm(32, eps=1e-6) and the mid attention"
        dd = dict(ch=cfg.base_channels, out_ch=cfg.out_channels, ch_mult=tuple(cfg.channel_mult),
                  num_res_blocks=cfg.num_res_blocks, attn_resolutions=[], dropout=0.0,
                  in_channels=cfg.in_channels, resolution=256, z_channels=cfg.latent_channels, double_z=True)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        lat = cfg.latent_channels
        self.quant_conv = torch.nn.Conv2d(2 * lat, 2 * lat, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = torch.nn.Conv2d(lat, lat, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def random_ldm(cfg: KLVAEConfig, seed: int = 0) -> LDMAutoencoderKL:
    torch.manual_seed(seed)
    model = LDMAutoencoderKL(cfg).eval()
    perturb_norms_(model, seed + 1)
    return model


def diffusers_from_ldm(ldm: LDMAutoencoderKL, cfg: KLVAEConfig) -> AutoencoderKL:
    """A diffusers AutoencoderKL holding `ldm`'s weights, mapped by diffusers' own converter (strict load)."""
    kwargs = diffusers_kwargs(cfg)
    converted = convert_ldm_vae_checkpoint(ldm.state_dict(), kwargs)
    model = AutoencoderKL(**kwargs).eval()
    model.load_state_dict(converted, strict=True)
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


@torch.no_grad()
def diffusers_outputs(model: AutoencoderKL, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, logvar, decode(mean)) as NHWC numpy."""
    post = model.encode(torch.from_numpy(x_nchw)).latent_dist
    dec = model.decode(post.mean).sample
    return tuple(t.numpy().transpose(0, 2, 3, 1) for t in (post.mean, post.logvar, dec))


@torch.no_grad()
def ldm_outputs(model: LDMAutoencoderKL, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, logvar, decode(mean)) as NHWC numpy."""
    mean, logvar = model.encode(torch.from_numpy(x_nchw))
    dec = model.decode(mean)
    return tuple(t.numpy().transpose(0, 2, 3, 1) for t in (mean, logvar, dec))


def jax_outputs(vae, x_nhwc: np.ndarray, z_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eqvae-jax side, the way the train step calls it (split once, jit a pure function, merge inside):
    (mean, logvar) of encode(x) and decode(z), as numpy."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, x, z):
        model = nnx.merge(graphdef, state)
        posterior = model.encode(x)
        return posterior.mean, posterior.logvar, model.decode(z)

    return tuple(np.asarray(a) for a in run(state, x_nhwc, z_nhwc))


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
