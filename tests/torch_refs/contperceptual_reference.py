"""PyTorch reference of the EQ-VAE objective, written from the LDM / zelaki-eqvae formulas (NCHW).

- `DiagonalGaussian`: LDM `DiagonalGaussianDistribution` (logvar clamp [-30, 20], sample with given noise, KL).
- `LPIPSWithDiscriminator`: LDM `contperceptual.py` with the perceptual net and discriminator passed in:
  rec = |x - x_hat| + perceptual_weight * LPIPS (broadcast), nll = rec / exp(logvar) + logvar, sum / B;
  KL sum / B; g_loss = -mean(D(x_hat)); adaptive weight from `torch.autograd.grad` w.r.t. the last layer;
  disc_factor via adopt_weight; hinge D loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)), two D calls.
- `transformed_forward`: eqvae `AutoencoderKL.forward` + the target transform of `training_step` for a given
  branch (scale/angle fixed by the caller, noise given so both frameworks use the same sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    return value if global_step < threshold else weight


class LPIPSWithDiscriminator(nn.Module):
    def __init__(
        self,
        perceptual_loss: nn.Module,
        discriminator: nn.Module,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
    ):
        super().__init__()
        self.perceptual_loss = perceptual_loss
        self.discriminator = discriminator
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=None):
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
        rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        if optimizer_idx == 0:
            logits_fake = self.discriminator(reconstructions.contiguous())
            g_loss = -torch.mean(logits_fake)
            if self.disc_factor > 0.0:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
            else:
                d_weight = torch.tensor(0.0)
            disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
            loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
            log = {
                "total": loss.detach(),
                "nll": nll_loss.detach(),
                "kl": kl_loss.detach(),
                "rec_loss": rec_loss.detach().mean(),
                "d_weight": d_weight.detach(),
                "disc_factor": torch.tensor(disc_factor),
                "g_loss": g_loss.detach(),
            }
            return loss, log
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
        log = {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


def transformed_forward(
    encode,
    decode,
    x: torch.Tensor,
    noise: torch.Tensor,
    branch: str,
    scale: float | tuple[float, float] = 1.0,
    angle: int = 0,
):
    """(target, reconstruction, posterior) of eqvae `training_step` for one branch.

    `encode(x) -> moments`, `decode(z) -> image`. branch: "equivariance" (latent sample resized by `scale`, then
    rot90 by `angle`; target the same), "lowres" (image resized first), "plain".
    """

    def interp(t):
        return F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)

    if branch == "lowres":
        x = interp(x)
    posterior = DiagonalGaussian(encode(x))
    z = posterior.sample(noise)
    if branch == "equivariance":
        z = torch.rot90(interp(z), k=angle, dims=[-1, -2])
        x = torch.rot90(interp(x), k=angle, dims=[-1, -2])
    return x, decode(z), posterior
