"""PyTorch reference of taming's `VQModel` (taming/models/vqgan.py) assembled from taming's own `Encoder`,
`Decoder` and `VectorQuantizer2` plus the two 1x1 quant convs (the class itself needs pytorch_lightning), with
random weights and perturbed GroupNorms, and helpers to compare it with eqvae-jax (`assert_parity`)."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import nnx
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from eqvae_jax.convert import vq_vae as conv
from eqvae_jax.models import vq_vae, weights
from eqvae_jax.models.vq_vae import VQVAEConfig

TOL = 1e-4


def ddconfig(cfg: VQVAEConfig) -> dict:
    return dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
                out_ch=cfg.out_channels, ch=cfg.base_channels, ch_mult=list(cfg.channel_mult),
                num_res_blocks=cfg.num_res_blocks, attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)


class TamingVQModel(torch.nn.Module):
    """taming `VQModel` minus the loss: same submodule names, same encode/decode/decode_code."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        assert (cfg.norm_num_groups, cfg.norm_eps) == (32, 1e-6), "taming fixes GroupNorm(32, eps=1e-6)"
        self.encoder = Encoder(**ddconfig(cfg))
        self.decoder = Decoder(**ddconfig(cfg))
        self.quantize = VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=cfg.beta, legacy=cfg.legacy)
        self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        """(quant, emb_loss, indices (B*h*w,), pre-quantization latents h): VQModel.encode plus h."""
        h = self.latents(x)
        quant, emb_loss, info = self.quantize(h)
        return quant, emb_loss, info[2], h

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """indices (B*h*w,) or (B, h, w) -> image, through `get_codebook_entry` (the working path)."""
        b, h, w = shape
        return self.decode(self.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, -1)))


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int, codebook_std: float | None = None) -> None:
    """GroupNorm affine params away from (1, 0); optionally a codebook ~ N(0, codebook_std) (a trained-looking
    codebook whose entries are as far apart as the latents, instead of taming's tiny uniform init)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    if codebook_std is not None:
        e = model.quantize.embedding.weight
        e.copy_(codebook_std * torch.randn(e.shape, generator=g))


def random_taming(cfg: VQVAEConfig, seed: int = 0, codebook_std: float | None = None) -> TamingVQModel:
    torch.manual_seed(seed)
    model = TamingVQModel(cfg).eval()
    perturb_(model, seed + 1, codebook_std)
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


@torch.no_grad()
def taming_outputs(model: TamingVQModel, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """latents, quantized, indices (B, h, w), codebook_loss, distances (B, h, w, n) and the decodes, NHWC."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    quant, loss, idx, h = model.encode(x)
    b, _, hh, ww = quant.shape
    z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    e = model.quantize.embedding.weight
    d = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", z, e.t())
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return dict(latents=nhwc(h), quantized=nhwc(quant), indices=idx.reshape(b, hh, ww).numpy(),
                codebook_loss=loss.numpy(), distances=d.reshape(b, hh, ww, -1).numpy(),
                decoded=nhwc(model.decode(quant)), decoded_indices=nhwc(model.decode_code(idx, (b, hh, ww))))


def flax_from_taming(model: torch.nn.Module, cfg: vq_vae.VQVAEConfig) -> vq_vae.VQVAE:
    """The VQVAE holding `model`'s weights, through the converter's key map."""
    vq = vq_vae.abstract(cfg)
    weights.assign_variables(vq, conv.torch_to_flax(numpy_state_dict(model), cfg))
    return vq


def jax_outputs(vq: vq_vae.VQVAE, x: np.ndarray) -> dict[str, np.ndarray]:
    """The eqvae-jax side the way a jitted step calls it: encode (latents, quantized, indices, loss) and both
    decodes, as numpy."""
    graphdef, state = nnx.split(vq)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        out = m.encode(x)
        return dict(latents=out.latents, quantized=out.quantized, indices=out.indices,
                    codebook_loss=out.codebook_loss, decoded=m.decode(out.quantized),
                    decoded_indices=m.decode_indices(out.indices))

    return {k: np.asarray(v) for k, v in run(state, x).items()}


def assert_parity(got: dict, ref: dict, codebook: np.ndarray, label: str) -> dict[str, float]:
    """Model-level parity: latents/decodes <= TOL, and identical code indices once ties are shown absent.

    A code index can only differ when, at the reference's latent z, two codes a (ours) and b (theirs) are
    closer in distance than our latent error can move it: d(z, a) - d(z, b) <= 2 |z - z'| |e_a - e_b|. The
    test asserts that the reference's smallest margin (best vs second best) exceeds that bound at every
    position, so no tie is possible, and then that every index is identical.
    """
    errors = {k: max_err(got[k], ref[k]) for k in ("latents", "quantized", "decoded", "decoded_indices")}
    errors["codebook_loss"] = abs(float(got["codebook_loss"]) - float(ref["codebook_loss"]))
    d = np.sort(ref["distances"], axis=-1)
    margin = d[..., 1] - d[..., 0]
    lat_err = np.linalg.norm(got["latents"] - ref["latents"], axis=-1)
    spread = np.max(np.linalg.norm(codebook[:, None] - codebook[None], axis=-1))
    agreement = float(np.mean(got["indices"] == ref["indices"]))
    print(f"{label}: max abs err {errors}; index agreement {agreement:.4f} over {got['indices'].size} codes; "
          f"smallest margin {margin.min():.3g} vs tie bound {2 * lat_err.max() * spread:.3g}")
    assert got["indices"].dtype == np.int32
    assert np.all(margin > 2 * lat_err * spread), "a tie is possible: pick inputs with larger margins"
    assert agreement == 1.0, np.argwhere(got["indices"] != ref["indices"])
    assert max(errors.values()) <= TOL, errors
    return errors


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
