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

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--size", type=int, default=256, help="square input resolution")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per batch size (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = p.parse_args(argv)

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
    header = ("batch", "jax s", "torch s", "torch/jax", "max|diff|", "codes =")
    print(" | ".join(f"{h:>9}" for h in header) + " | jax compile s")
    for batch in args.batch:
        x = np.random.default_rng(0).uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
        x_jax = jax.device_put(x)
        x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        start = time.perf_counter()
        out_jax, idx_jax = jax.block_until_ready(jax_forward(state, x_jax))  # compile + warm-up
        compile_s = time.perf_counter() - start
        out_torch, idx_torch = torch_forward(x_torch)  # warm-up
        t_jax = _median_seconds(lambda x=x_jax: jax.block_until_ready(jax_forward(state, x)), args.repeats)
        t_torch = _median_seconds(lambda x=x_torch: torch_forward(x), args.repeats)
        diff = float(np.abs(np.asarray(out_jax) - out_torch.numpy().transpose(0, 2, 3, 1)).max())
        agree = float(np.mean(np.asarray(idx_jax).ravel() == idx_torch.numpy()))
        row = (f"{batch:>9}", f"{t_jax:>9.3f}", f"{t_torch:>9.3f}", f"{t_torch / t_jax:>9.2f}",
               f"{diff:>9.2e}", f"{agree:>9.4f}", f"{compile_s:.1f}")
        print(" | ".join(row) + f"   (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
