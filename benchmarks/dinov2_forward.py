"""DINOv2-B/14 forward (REPA's teacher) on the CPU: JAX (jitted, warmed up) vs transformers' torch Dinov2Model.

    python -m benchmarks.dinov2_forward                 # from the repo root: 224 px, batch 8, 5 repeats
    python -m benchmarks.dinov2_forward --batch 1 8 --repeats 3

Both sides run the same random weights (transformers' init of a ViT-B/14 whose position grid is 16x16, i.e.
REPA's teacher after its pos_embed is resampled for 224 px inputs), moved by the converter's transformers
path. Prints the median wall time per batch size, the ratio torch / JAX (> 1: JAX is faster), and the max abs
difference of the patch tokens as a sanity check. Timings on a shared machine are noisy: the load average is
printed with them.
"""

from __future__ import annotations

import os
import tempfile

from benchmarks.common import forward_parser, header, time_forward

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> None:
    args = forward_parser(__doc__, [8], 224, "square input resolution (multiple of 14)").parse_args(argv)

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Dinov2Config, Dinov2Model

    from eqvae_jax.convert import dinov2 as conv
    from eqvae_jax.models import dinov2
    from eqvae_jax.models.weights import assign_variables

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = Dinov2Model(Dinov2Config(image_size=args.size)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        hub_sd, cfg, _ = conv.read_source(tmp)
    model = dinov2.abstract(cfg)
    assign_variables(model, conv.hub_to_flax(hub_sd, cfg))
    del hub_sd
    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_forward(state, x):
        return nnx.merge(graphdef, state)(x)["x_norm_patchtokens"]

    @torch.no_grad()
    def torch_forward(x):
        return ref(pixel_values=x).last_hidden_state[:, 1:]

    grid = args.size // cfg.patch_size
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"DINOv2-B/14 forward, {args.size}x{args.size} ({grid}x{grid} patches), fp32, median of {args.repeats} "
          f"(jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load})")
    print(header("max|diff|"))
    for batch in args.batch:
        x = np.random.default_rng(0).standard_normal((batch, args.size, args.size, 3)).astype(np.float32)
        r = time_forward(lambda x: jax_forward(state, x), torch_forward, x, args.repeats)
        diff = float(np.abs(np.asarray(r.out_jax) - r.out_torch.numpy()).max())
        print(r.row(batch, f"{diff:>9.2e}"))
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
