"""Encode+decode of the full SD-VAE (random weights, fp32): JAX (jitted, warmed up) vs diffusers, same CPU.

    python -m benchmarks.vae_forward        # from the repo root: 256x256, batch 1 and 4, 5 repeats
    python -m benchmarks.vae_forward --batch 1 --repeats 2 --size 128

Both sides run `decode(encode(x).mean)` on the same weights (diffusers' random init, copied over with the
converter's key map). Prints the median wall time of the repeats per batch size and the ratio torch / JAX
(> 1: JAX is faster), plus the max abs difference of the outputs as a sanity check.
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
    print(header("max|diff|"))
    for batch in args.batch:
        x = np.random.default_rng(0).uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
        r = time_forward(lambda x: jax_forward(state, x), torch_forward, x, args.repeats)
        diff = float(np.abs(np.asarray(r.out_jax) - r.out_torch.numpy().transpose(0, 2, 3, 1)).max())
        print(r.row(batch, f"{diff:>9.2e}"))

if __name__ == "__main__":
    main()
