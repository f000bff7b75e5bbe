"""FID Inception feature pass: JAX vs torch-fidelity on this CPU, and the TPU program compiled ahead of time.

    python -m benchmarks.inception [--batch 8 16 32] [--size 299 256] [--repeats 3]        # CPU, same weights
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.inception --tpu [--per_chip 128] [--targets v4-8,...]

CPU: features/s of `eqvae_jax.eval.inception` (jitted, warmed up) and of torch-fidelity 0.4.0's
`FeatureExtractorInceptionV3` (loaded from .venv/side/torch_fidelity like the parity test) on the same random
weights (ours, exported with the converter's key map), uint8 inputs at each size (299: no resize; 256: the ADM
ImageNet size, resized inside both). Median of the repeats, ratio JAX / torch (> 1: JAX is faster), and the max
relative difference of the pool features as a sanity check.

TPU (`--tpu`, libtpu's compiler, see requirements-tpu-aot.txt): the extractor's real program
(`eqvae_jax.eval.features`, batch sharded over every chip, weights replicated) for 256x256 uint8 inputs is
compiled for v4-8, v5p-8, v5e-8 and v6e-8 at `--per_chip` images per chip, with precision "highest" (the
default: float32 accuracy, what ADM-comparable numbers need) and "default" (one bf16 MXU pass). Reported per
chip: XLA's FLOPs per image, memory, and the images/s that the FLOPs imply at 40% MFU of the bf16 peak. At
"highest" the MXU makes several bf16 passes per float32 product (XLA's 6-pass bf16 algorithm on TPU), which
cost_analysis does not count; the column "/6" divides by it.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import median_seconds

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend stays CPU (TPUs are compile-only topologies)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

MFU = 0.4
PASSES_HIGHEST = 6


def cpu(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    import torch

    from eqvae_jax.convert import inception as conv
    from eqvae_jax.eval import inception
    from eqvae_jax.models.weights import flat_variables, variable_shapes
    from tests.torch_refs import fidelity_inception

    if args.threads:
        torch.set_num_threads(args.threads)
    net = inception.build()
    flat = flat_variables(net)
    sd = conv.key_map().to_torch(flat, variable_shapes(net))
    sd["fc.bias"] = np.zeros((1008,), np.float32)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"inception_bench_{os.getpid()}.pth")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    try:
        ref = fidelity_inception.feature_extractor(path)
    finally:
        os.remove(path)
    print(f"FID Inception features, fp32, median of {args.repeats} (jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    print(" | ".join(f"{h:>9}" for h in ("input", "batch", "jax img/s", "torch im/s", "jax/torch", "pool rel"))
          + " | jax compile s", flush=True)
    for size in args.size:
        for batch in args.batch:
            x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            x_jax = jax.device_put(x)
            x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            start = time.perf_counter()
            got = np.asarray(jax.block_until_ready(net(x_jax))["pool"])
            compile_s = time.perf_counter() - start
            with torch.no_grad():
                want = ref(x_torch)[0].numpy()
                t_torch = median_seconds(lambda x=x_torch: ref(x), args.repeats)
            t_jax = median_seconds(lambda x=x_jax: jax.block_until_ready(net(x)), args.repeats)
            rel = float(np.abs(got - want).max() / np.abs(want).max())
            row = (f"{size:>9}", f"{batch:>9}", f"{batch / t_jax:>9.2f}", f"{batch / t_torch:>9.2f}",
                   f"{t_torch / t_jax:>9.2f}", f"{rel:>9.1e}", f"{compile_s:.1f}")
            print(" | ".join(row), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def tpu(args: argparse.Namespace) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.tpu_aot_common import GIB, V4_8, V5E_8, V5P_8, V6E_8, memory_report, topology_mesh, xla_flops
    from eqvae_jax.eval import inception
    from eqvae_jax.eval.features import _compiled
    from eqvae_jax.parallel.mesh import batch_sharding, replicated

    targets = [t for t in (V4_8, V5P_8, V5E_8, V6E_8) if t.name in args.targets.split(",")]
    print(f"FID Inception feature pass, 256x256 uint8 inputs, {args.per_chip} images per chip, batch sharded over "
          f"every chip; jax {jax.__version__}; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'slice':<8}{'precision':>10}{'GFLOP/img':>11}{'HBM/chip':>10}{'args':>8}{'temp':>8}"
          f"{'img/s/chip@40%':>16}{'/6':>8}{'slice img/s':>13}{'compile':>9}", flush=True)
    for target in targets:
        mesh = topology_mesh(target)
        for precision in args.precision.split(","):
            cfg = dataclasses.replace(inception.InceptionConfig(), precision=precision)
            graphdef, state = nnx.split(inception.abstract(cfg))
            fn = _compiled(graphdef, mesh)
            batch = args.per_chip * target.chips
            images = jax.ShapeDtypeStruct((batch, 256, 256, 3), jnp.uint8, sharding=batch_sharding(mesh))
            rep = replicated(mesh)
            state = jax.tree.map(lambda a, rep=rep: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
            start = time.perf_counter()
            try:
                compiled = fn.lower(state, images).compile()
            except Exception as e:  # report and go on with the other targets
                print(f"{target.name:<8}{precision:>10}  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            seconds = time.perf_counter() - start
            mem = memory_report(compiled)
            flops_img = xla_flops(compiled) / args.per_chip  # cost_analysis is per device
            per_chip = MFU * target.peak_tflops * 1e12 / flops_img
            adjusted = per_chip / PASSES_HIGHEST if precision == "highest" else per_chip
            print(f"{target.name:<8}{precision:>10}{flops_img / 1e9:>11.2f}{target.hbm_bytes / GIB:>9.1f}G"
                  f"{mem['args_gib']:>7.2f}G{mem['temp_gib']:>7.2f}G{per_chip:>16.0f}"
                  f"{adjusted if precision == 'highest' else float('nan'):>8.0f}"
                  f"{adjusted * target.chips:>13.0f}{seconds:>8.0f}s", flush=True)
    print("img/s/chip@40%: 0.4 x bf16 peak / XLA FLOPs per image; '/6': the same for 'highest' divided by its "
          "6 bf16 MXU passes; slice img/s uses '/6' for 'highest'.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tpu", action="store_true", help="AOT-compile for TPU slices instead of timing the CPU")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32], help="CPU batch sizes")
    p.add_argument("--size", type=int, nargs="+", default=[299, 256], help="CPU input sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--per_chip", type=int, default=128, help="TPU images per chip")
    p.add_argument("--precision", default="highest,default", help="TPU precisions to compile")
    p.add_argument("--targets", default="v4-8,v5p-8,v5e-8,v6e-8", help="TPU slices")
    args = p.parse_args(argv)
    tpu(args) if args.tpu else cpu(args)


if __name__ == "__main__":
    main()
