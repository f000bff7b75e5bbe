"""Encode+decode of the full taming VQGAN f16 (1024 codes, random weights, fp32): JAX (jitted, warmed up) vs
taming's own modules in PyTorch, same CPU.

    python -m benchmarks.vq_forward        # from the repo root: 256x256, batch 1 and 4, 5 repeats
    python -m benchmarks.vq_forward --batch 1 --repeats 2 --size 128

Both sides run decode(quantize(quant_conv(encoder(x)))) on the same weights (taming's init drawn in torch, copied
with the converter's key map). Prints the median wall time of the repeats per batch size and the ratio
torch / JAX (> 1: JAX is faster), plus the max abs difference of the decodes and the agreement of the code
indices as sanity checks (random weights and taming's tiny codebook init: a few near-ties may break differently).
"""

from __future__ import annotations

import os

from benchmarks.common import forward_parser, header, time_forward

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> None:
    args = forward_parser(__doc__, [1, 4], 256, "square input resolution").parse_args(argv)

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    from eqvae_jax.convert import vq_vae as conv
    from eqvae_jax.models import vq_vae, weights

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = vq_vae.taming_f16_n1024()
    dd = dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3, out_ch=3,
              ch=cfg.base_channels, ch_mult=list(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
    torch.manual_seed(0)
    ref = torch.nn.Module()  # taming VQModel's submodules (the class itself needs pytorch_lightning)
    ref.encoder, ref.decoder = Encoder(**dd), Decoder(**dd)
    ref.quantize = VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=0.25)
    ref.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
    ref.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
    ref.eval()
    vq = vq_vae.abstract(cfg)
    weights.assign_variables(vq, conv.torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, cfg))
    graphdef, state = nnx.split(vq)

    @jax.jit
    def jax_forward(state, x):
        model = nnx.merge(graphdef, state)
        out = model.encode(x)
        return model.decode(out.quantized), out.indices

    @torch.no_grad()
    def torch_forward(x):
        quant, _, (_, _, indices) = ref.quantize(ref.quant_conv(ref.encoder(x)))
        return ref.decoder(ref.post_quant_conv(quant)), indices

    print(f"taming VQGAN f16 n1024 ({sum(v.size for v in weights.flat_variables(vq).values()) / 1e6:.3f}M params) "
          f"encode+quantize+decode, {args.size}x{args.size}, fp32, median of {args.repeats} "
          f"(jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f})")
    print(header("max|diff|", "codes ="))
    for batch in args.batch:
        x = np.random.default_rng(0).uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
        r = time_forward(lambda x: jax_forward(state, x), torch_forward, x, args.repeats)
        (out_jax, idx_jax), (out_torch, idx_torch) = r.out_jax, r.out_torch
        diff = float(np.abs(np.asarray(out_jax) - out_torch.numpy().transpose(0, 2, 3, 1)).max())
        agree = float(np.mean(np.asarray(idx_jax).ravel() == idx_torch.numpy()))
        print(r.row(batch, f"{diff:>9.2e}", f"{agree:>9.4f}") + f"   (load average {os.getloadavg()[0]:.2f})")

if __name__ == "__main__":
    main()
