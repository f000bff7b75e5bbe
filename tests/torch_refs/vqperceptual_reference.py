"""PyTorch reference of the VQGAN objective, transcribed from taming `modules/losses/vqperceptual.py`
(`VQLPIPSWithDiscriminator`; its module imports taming's LPIPS, which needs torchvision, so the class is written
out here with the perceptual net and discriminator passed in), and the EQ-VQGAN forward of one branch.

- rec = |x - x_hat| + perceptual_weight * p_loss (per image, broadcast); nll = mean(rec) (taming's line
  `nll_loss = torch.mean(nll_loss)`; the sum / B variant is commented out upstream);
- g_loss = -mean(D(x_hat)); d_weight from `torch.autograd.grad` of nll and g w.r.t. the last layer, clamped
  [0, 1e4], detached, x disc_weight; disc_factor via adopt_weight;
- generator total = nll + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss.mean();
- D: disc_factor * hinge(D(x.detach()), D(x_hat.detach())), two D calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from contperceptual_reference import adopt_weight, hinge_d_loss
from torch import nn


class VQLPIPSWithDiscriminator(nn.Module):
    def __init__(self, perceptual_loss: nn.Module, discriminator: nn.Module, disc_start: int,
                 codebook_weight: float = 1.0, disc_factor: float = 1.0, disc_weight: float = 1.0,
                 perceptual_weight: float = 1.0):
        super().__init__()
        self.codebook_weight = codebook_weight
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = perceptual_weight
        self.discriminator = discriminator
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def calculate_adaptive_weight(self, nll_loss, g_loss, last_layer):
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None):
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
        rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = torch.mean(rec_loss)
        if optimizer_idx == 0:
            logits_fake = self.discriminator(reconstructions.contiguous())
            g_loss = -torch.mean(logits_fake)
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
            disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
            loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
            log = {"total_loss": loss.detach(), "quant_loss": codebook_loss.detach().mean(),
                   "nll_loss": nll_loss.detach(), "rec_loss": rec_loss.detach().mean(),
                   "p_loss": p_loss.detach().mean(), "d_weight": d_weight.detach(),
                   "disc_factor": torch.tensor(disc_factor), "g_loss": g_loss.detach()}
            return loss, log
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}


def transformed_vq_forward(latents_of, quantize, decode, x: torch.Tensor, branch: str,
                           scale: float | tuple[float, float] = 1.0, angle: int = 0):
    """(target, reconstruction, codebook_loss) of EQ-VQGAN for one branch (EQ-VAE §3.3: transform the latent
    features before quantization): "equivariance" resizes then rotates the pre-quantization latents and the
    target alike; "lowres" downscales the image first; "plain". `quantize` is taming's VectorQuantizer2."""

    def interp(t):
        return F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)

    if branch == "lowres":
        x = interp(x)
    h = latents_of(x)
    if branch == "equivariance":
        h = torch.rot90(interp(h), k=angle, dims=[-1, -2])
        x = torch.rot90(interp(x), k=angle, dims=[-1, -2])
    quant, codebook_loss, _ = quantize(h)
    return x, decode(quant), codebook_loss
