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

import argparse
import os
import statistics
import tempfile
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
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes")
    p.add_argument("--size", type=int, default=224, help="square input resolution (multiple of 14)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per batch size (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = p.parse_args(argv)

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
    header = ("batch", "jax s", "torch s", "torch/jax", "max|diff|")
    print(" | ".join(f"{h:>9}" for h in header) + " | jax compile s")
    for batch in args.batch:
        x = np.random.default_rng(0).standard_normal((batch, args.size, args.size, 3)).astype(np.float32)
        x_jax = jax.device_put(x)
        x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        start = time.perf_counter()
        out_jax = np.asarray(jax_forward(state, x_jax).block_until_ready())  # compile + warm-up
        compile_s = time.perf_counter() - start
        out_torch = torch_forward(x_torch).numpy()  # warm-up
        t_jax = _median_seconds(lambda x=x_jax: jax_forward(state, x).block_until_ready(), args.repeats)
        t_torch = _median_seconds(lambda x=x_torch: torch_forward(x), args.repeats)
        diff = float(np.abs(out_jax - out_torch).max())
        row = (f"{batch:>9}", f"{t_jax:>9.3f}", f"{t_torch:>9.3f}", f"{t_torch / t_jax:>9.2f}",
               f"{diff:>9.2e}", f"{compile_s:.1f}")
        print(" | ".join(row))
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
