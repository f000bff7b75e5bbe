"""One framework's EQ-VAE micro-steps alone in a process: wall, user and system CPU and minor page faults per step.

    python -m benchmarks.page_faults --framework jax [--branches eq24] [--steps 4] [--size 256] [--batch 1]
    EQVAE_MALLOC=system python -m benchmarks.page_faults ...   # glibc's default allocator settings

The same steps as `benchmarks.train_step` (the real job's G then D step; the PyTorch reference's), after
`eqvae_jax.host_malloc.tune_for_cpu` as the jobs call it (`train_step.setup_threads`). The first row includes
JAX's compile. Shows what the allocator settings change (docs/cpu_speed.md, "Page faults"): with glibc's
defaults every JAX step faults its multi-GB temporary buffer in afresh. Prints a table; never used as a test.
"""

from __future__ import annotations

import argparse
import resource
import time

from benchmarks import train_step as ts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ts.add_common_args(parser)
    parser.set_defaults(batch=1, branches="eq24")
    parser.add_argument("--framework", choices=("jax", "torch"), required=True)
    parser.add_argument("--steps", type=int, default=4, help="micro-steps, the first one included")
    args = parser.parse_args()
    ts.setup_threads(parser, args)
    branches = ts.check_args(parser, args)
    from eqvae_jax.models import kl_vae

    if args.framework == "jax":
        make = ts.jax_runner(args)[0]
    else:
        make = ts.torch_runner(args, kl_vae.PRESETS[args.preset]())
    print(f"{args.framework} G+D micro-steps, {args.preset} {args.size}px batch {args.batch}; "
          f"{ts.thread_settings()}", flush=True)
    print(f"{'branch':<8}{'step':>4}{'wall s':>9}{'user s':>9}{'sys s':>8}{'minor faults':>14}")
    for branch in branches:
        step = make(branch)
        for i in range(args.steps):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            print(f"{branch:<8}{i:>4}{wall:>9.2f}{after.ru_utime - before.ru_utime:>9.2f}"
                  f"{after.ru_stime - before.ru_stime:>8.2f}{after.ru_minflt - before.ru_minflt:>14}", flush=True)


if __name__ == "__main__":
    main()
