"""Encode+decode of the full SD-VAE (random weights, fp32): JAX (jitted, warmed up) vs diffusers, same CPU.

    python -m benchmarks.vae_forward        # from the repo root: 256x256, batch 1 and 4, 5 repeats
    python -m benchmarks.vae_forward --batch 1 --repeats 2 --size 128

Both sides run `decode(encode(x).mean)` on the same weights (diffusers' random init, copied over with the
converter's key map). Prints the median wall time of the repeats per batch size and the ratio torch / JAX
(> 1: JAX is faster), plus the max abs difference of the outputs as a sanity check.
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
    from diffusers import AutoencoderKL
    from flax import nnx

    from eqvae_jax.convert import kl_vae_keys as keys
    from eqvae_jax.models import kl_vae, weights

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = kl_vae.sd_vae()
    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4).eval()
    vae = kl_vae.abstract(cfg)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    weights.assign_variables(vae, keys.torch_to_flax(sd, cfg, "diffusers"))
    graphdef, state = nnx.split(vae)

    @jax.jit
    def jax_forward(state, x):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode(x).mean)

    @torch.no_grad()
    def torch_forward(x):
        return ref.decode(ref.encode(x).latent_dist.mean).sample

    print(f"SD-VAE encode+decode, {args.size}x{args.size}, fp32, median of {args.repeats} "
          f"(jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads)")
    header = ("batch", "jax s", "torch s", "torch/jax", "max|diff|")
    print(" | ".join(f"{h:>9}" for h in header) + " | jax compile s")
    for batch in args.batch:
        x = np.random.default_rng(0).uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
        x_jax = jax.device_put(x)
        x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        start = time.perf_counter()
        out_jax = np.asarray(jax_forward(state, x_jax).block_until_ready())  # compile + warm-up
        compile_s = time.perf_counter() - start
        out_torch = torch_forward(x_torch).numpy().transpose(0, 2, 3, 1)  # warm-up
        t_jax = _median_seconds(lambda x=x_jax: jax_forward(state, x).block_until_ready(), args.repeats)
        t_torch = _median_seconds(lambda x=x_torch: torch_forward(x), args.repeats)
        diff = float(np.abs(out_jax - out_torch).max())
        row = (f"{batch:>9}", f"{t_jax:>9.3f}", f"{t_torch:>9.3f}", f"{t_torch / t_jax:>9.2f}",
               f"{diff:>9.2e}", f"{compile_s:.1f}")
        print(" | ".join(row))


if __name__ == "__main__":
    main()
