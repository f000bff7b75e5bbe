"""Start-up compile time of the EQ-VAE job: one program at a time vs the compile pool, cold and warm cache.

    python -m benchmarks.compile_ahead [--scales 8-31] [--size 64] [--workers 1,2] [--micro_steps 4000]

The job's own pieces on this host's CPU backend: `train.eqvae.job.build` of configs/sdvae_ft.py:tiny (random tiny
autoencoder, no LPIPS) with the reference transform grid (scales k/32 for k in --scales, quarter turns 1-3,
p_eq 0.5, p_lowres 0.25, D redraws: 49 G + 49 D programs for 8-31), the programs in the order the seeded sampler
first needs them (`train.eqvae.ahead`), compiled by `CompilePool` with each --workers count. workers=1 is what
lazy compilation costs at least (the same programs one after another, without the training steps between them).
Each mode runs in a fresh process (JAX caches traces in memory); 'warm' repeats the largest pool with the
persistent compilation cache that a first pass filled, i.e. a restarted run. Prints time to the first step's
two programs, to all programs, and the per-program compile seconds (median / max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _measure(scales: list[int], size: int, workers: int, micro_steps: int, cache_dir: str) -> dict:
    import jax

    from configs import sdvae_ft
    from eqvae_jax.losses import equivariance as eq
    from eqvae_jax.train.compile_pool import CompilePool
    from eqvae_jax.train.eqvae import ahead
    from eqvae_jax.train.eqvae import job as eqvae_job
    from eqvae_jax.train.eqvae.config import parse_config
    from eqvae_jax.train.services import enable_compilation_cache

    if cache_dir:
        enable_compilation_cache(cache_dir)
    c = sdvae_ft.get_config("tiny")
    c.transform.scale_numerators, c.transform.scale_denominator = scales, 32
    c.transform.rotations = [1, 2, 3]
    c.data.image_size, c.global_batch_size, c.mesh.data = size, 2, 1
    config = parse_config(c, num_devices=jax.device_count())
    built = eqvae_job.build(config)
    hw = (size, size)
    sampler = eq.TransformSampler(config.transform, config.seed)
    programs = ahead.programs_in_need_order(config.transform, sampler.state(), hw, range(micro_steps), 0,
                                            built.spec.return_pair)
    pool = CompilePool(workers, lambda _: None)
    start = time.perf_counter()
    ahead.submit_programs(pool, programs, built.steps, ahead.abstract(built.state),
                          ahead.abstract(built.lpips_state), built.mesh,
                          (config.global_batch_size, *hw, 3), built.spec.return_pair)
    first_two = [pool.take(name, plan) for name, plan in programs[:2]]
    first_step = max(r.finished_at for r in first_two) - start
    ready = [pool.take(name, plan) for name, plan in programs]
    every = max(r.finished_at for r in ready) - start
    compile_s = [r.record.compile_s for r in ready]
    pool.close()
    return {"programs": len(programs), "first_step_s": first_step, "all_s": every,
            "median_s": statistics.median(compile_s), "max_s": max(compile_s), "sum_s": sum(compile_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="8-31", help="k in k/32: 'a-b' or a comma list")
    p.add_argument("--size", type=int, default=64, help="image size (k * size / 32 must be integral)")
    p.add_argument("--workers", default="1,2", help="pool sizes to compare (1 = one program at a time)")
    p.add_argument("--micro_steps", type=int, default=4000, help="draws to look ahead for the order")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    a_, _, b_ = a.scales.partition("-")
    scales = list(range(int(a_), int(b_) + 1)) if b_ else [int(s) for s in a.scales.split(",")]
    if a.child:
        workers, cache_dir = json.loads(a.child)
        print(json.dumps(_measure(scales, a.size, workers, a.micro_steps, cache_dir)))
        return

    def child(workers: int, cache_dir: str = "") -> dict:
        cmd = [sys.executable, "-m", "benchmarks.compile_ahead", f"--scales={a.scales}", f"--size={a.size}",
               f"--micro_steps={a.micro_steps}", f"--child={json.dumps([workers, cache_dir])}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    pools = [int(w) for w in a.workers.split(",")]
    print(f"EQ-VAE start-up compile, tiny model at {a.size} px, scales {a.scales}/32, {os.cpu_count()} CPUs",
          flush=True)
    print(f"{'mode':<24}{'programs':>9}{'first step s':>14}{'all programs s':>16}{'speed-up':>10}{'median s':>10}"
          f"{'max s':>8}{'load':>6}", flush=True)
    base = None

    def row(name: str, r: dict) -> None:
        nonlocal base
        base = base or r["all_s"]
        print(f"{name:<24}{r['programs']:>9}{r['first_step_s']:>14.1f}{r['all_s']:>16.1f}{base / r['all_s']:>10.2f}"
              f"{r['median_s']:>10.2f}{r['max_s']:>8.2f}{os.getloadavg()[0]:>6.1f}", flush=True)

    for w in pools:
        row(f"cold, {w} thread{'s' * (w > 1)}", child(w))
    with tempfile.TemporaryDirectory() as cache:
        child(max(pools), cache)
        row(f"warm cache, {max(pools)} threads", child(max(pools), cache))


if __name__ == "__main__":
    main()
