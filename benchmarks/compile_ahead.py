"""Start-up compile time of the EQ-VAE job: one program at a time vs the compile pool, cold and warm cache.

    python -m benchmarks.compile_ahead [--scales 8-31] [--size 64] [--workers 1,2] [--micro_steps 4000]
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.compile_ahead --target v5p-8 [--steps d_step] [--programs 4]

The job's own pieces on this host's CPU backend: `train.eqvae.job.build` of configs/sdvae_ft.py:tiny (random tiny
autoencoder, no LPIPS) with the reference transform grid (scales k/32 for k in --scales, quarter turns 1-3,
p_eq 0.5, p_lowres 0.25, D redraws: 49 G + 49 D programs for 8-31), the programs in the order the seeded sampler
first needs them (`train.eqvae.compile_order`), compiled by `CompilePool` with each --workers count. workers=1 is what
lazy compilation costs at least (the same programs one after another, without the training steps between them).
Each mode runs in a fresh process (JAX caches traces in memory); 'warm' repeats the largest pool with the
persistent compilation cache that its cold run filled, i.e. a restarted run. Prints time to the first step's
two programs, to all programs, and the per-program compile seconds (median / max).

`--target ACCEL` measures the same on a TPU slice's programs compiled here with libtpu's compiler (compile-only,
no TPU; what `launch/tpu.py precompile` runs): configs/sdvae_ft.py (the full SD-VAE job, its reference grid) for
that topology, the first `--programs` programs of `--steps` in the order the seeded sampler first needs them
(one sdvae_ft G program takes 9-23 min to compile on a 2-core box, so a subset). No warm row (the cache
behaviour on a slice is `launch/tpu.py precompile`'s).
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
    from eqvae_jax.train.eqvae import compile_order
    from eqvae_jax.train.eqvae import job as eqvae_job
    from eqvae_jax.train.eqvae.config import parse_config
    from eqvae_jax.train.run_dir import enable_compilation_cache

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
    programs = compile_order.programs_in_need_order(config.transform, sampler.state(), hw, range(micro_steps), 0,
                                                    built.spec.return_pair)
    pool = CompilePool(workers, lambda _: None)
    start = time.perf_counter()
    compile_order.submit_programs(pool, programs, built.steps, compile_order.abstract(built.state),
                                  compile_order.abstract(built.lpips_state), built.mesh,
                                  (config.global_batch_size, *hw, 3), built.spec.return_pair)
    return {**_take_all(pool, programs, 2, start), "maps": _memory_maps()}  # the first step: its G and D


def _memory_maps() -> int:
    """This process's memory mappings: XLA:CPU JIT-links every kernel of every program into its own mappings,
    and Linux refuses more than vm.max_map_count (65530 by default) with ENOMEM."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _take_all(pool, programs: list, first: int, start: float) -> dict:
    """Wait for every submitted program, then close the pool: seconds from `start` until the first `first`
    programs and until all were compiled, and each one's compile seconds."""
    first_ready = [pool.take(name, plan) for name, plan in programs[:first]]
    ready = [pool.take(name, plan) for name, plan in programs]
    pool.close()
    compile_s = [r.record.compile_s for r in ready]
    return {"programs": len(programs), "first_step_s": max(r.finished_at for r in first_ready) - start,
            "all_s": max(r.finished_at for r in ready) - start,
            "median_s": statistics.median(compile_s), "max_s": max(compile_s), "sum_s": sum(compile_s),
            "each_s": [[name, str(plan), round(s, 1)] for (name, plan), s in zip(programs, compile_s, strict=True)]}


def _measure_topology(target: str, workers: int, steps: list[str], count: int, micro_steps: int) -> dict:
    """The first `count` programs (of `steps`) of configs/sdvae_ft.py for `target`, compiled by a pool of `workers`."""
    from benchmarks.tpu_aot import job_config  # the config file with random-init shapes, no weight files
    from configs import sdvae_ft
    from eqvae_jax.losses import equivariance as eq
    from eqvae_jax.train.compile_pool import CompilePool
    from eqvae_jax.train.eqvae import compile_order
    from eqvae_jax.train.eqvae.precompile import topology_programs

    base = sdvae_ft.get_config()
    with tempfile.TemporaryDirectory() as workdir:
        built = topology_programs(job_config(base.global_batch_size, base.model.dtype), workdir, target)
    config = built.config
    hw = (config.data.image_size,) * 2
    sampler = eq.TransformSampler(config.transform, config.seed)
    order = compile_order.programs_in_need_order(config.transform, sampler.state(), hw, range(micro_steps),
                                                 config.pretrain_updates * config.optim.accumulate, built.return_pair)
    programs = [p for p in order if p[0] in steps][:count]
    pool = CompilePool(workers, lambda _: None)
    start = time.perf_counter()
    built.submit(pool, programs)
    return _take_all(pool, programs, 1, start)


def _run_child(cmd: list[str]) -> dict:
    """One measurement in a fresh process (faulthandler on); its last stdout line is the JSON result."""
    done = subprocess.run([cmd[0], "-X", "faulthandler", *cmd[1:]], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit status {done.returncode}:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="8-31", help="k in k/32: 'a-b' or a comma list")
    p.add_argument("--size", type=int, default=64, help="image size (k * size / 32 must be integral)")
    p.add_argument("--workers", default="1,2", help="pool sizes to compare (1 = one program at a time)")
    p.add_argument("--micro_steps", type=int, default=4000, help="draws to look ahead for the order")
    p.add_argument("--target", default="", help="TPU slice to compile sdvae_ft for with libtpu AOT ('v5p-8')")
    p.add_argument("--steps", default="g_step,d_step", help="--target: which steps' programs")
    p.add_argument("--programs", type=int, default=4, help="--target: how many programs (first needed first)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.target:
        _topology_main(a)
        return
    a_, _, b_ = a.scales.partition("-")
    scales = list(range(int(a_), int(b_) + 1)) if b_ else [int(s) for s in a.scales.split(",")]
    if a.child:
        workers, cache_dir = json.loads(a.child)
        print(json.dumps(_measure(scales, a.size, workers, a.micro_steps, cache_dir)))
        return

    def child(workers: int, cache_dir: str = "") -> dict:
        cmd = [sys.executable, "-m", "benchmarks.compile_ahead", f"--scales={a.scales}", f"--size={a.size}",
               f"--micro_steps={a.micro_steps}", f"--child={json.dumps([workers, cache_dir])}"]
        return _run_child(cmd)

    pools = [int(w) for w in a.workers.split(",")]
    print(f"EQ-VAE start-up compile, tiny model at {a.size} px, scales {a.scales}/32, {os.cpu_count()} CPUs",
          flush=True)
    print(f"{'mode':<24}{'programs':>9}{'first step s':>14}{'all programs s':>16}{'speed-up':>10}{'median s':>10}"
          f"{'max s':>8}{'maps':>8}{'load':>6}", flush=True)
    base = None

    def row(name: str, r: dict) -> None:
        nonlocal base
        base = base or r["all_s"]
        print(f"{name:<24}{r['programs']:>9}{r['first_step_s']:>14.1f}{r['all_s']:>16.1f}{base / r['all_s']:>10.2f}"
              f"{r['median_s']:>10.2f}{r['max_s']:>8.2f}{r['maps']:>8}{os.getloadavg()[0]:>6.1f}", flush=True)

    with tempfile.TemporaryDirectory() as cache:
        for w in pools:  # the largest pool's cold run fills the persistent cache that the warm run reads
            row(f"cold, {w} thread{'s' * (w > 1)}", child(w, cache if w == max(pools) else ""))
        row(f"warm cache, {max(pools)} threads", child(max(pools), cache))


def _topology_main(a: argparse.Namespace) -> None:
    from eqvae_jax.parallel import aot  # no jax import: the environment is set before jax starts

    aot.prepare_environment()
    steps = a.steps.split(",")
    if a.child:
        print(json.dumps(_measure_topology(a.target, json.loads(a.child)[0], steps, a.programs, a.micro_steps)))
        return
    print(f"configs/sdvae_ft.py programs for {a.target} (libtpu compile-only), the first {a.programs} of {a.steps} "
          f"in need order, {os.cpu_count()} CPUs", flush=True)
    print(f"{'mode':<14}{'programs':>9}{'first s':>9}{'all s':>8}{'speed-up':>10}{'sum of programs s':>19}"
          f"{'load':>6}", flush=True)
    base, each = None, None
    for w in (int(x) for x in a.workers.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.compile_ahead", f"--target={a.target}", f"--steps={a.steps}",
               f"--programs={a.programs}", f"--micro_steps={a.micro_steps}", f"--child={json.dumps([w, ''])}"]
        r = _run_child(cmd)
        base, each = base or r["all_s"], each or r["each_s"]
        print(f"{f'{w} thread' + 's' * (w > 1):<14}{r['programs']:>9}{r['first_step_s']:>9.0f}{r['all_s']:>8.0f}"
              f"{base / r['all_s']:>10.2f}{r['sum_s']:>19.0f}{os.getloadavg()[0]:>6.1f}", flush=True)
    print("per program, one at a time (s): " + "; ".join(f"{n} [{p}] {s:.0f}" for n, p, s in each))


if __name__ == "__main__":
    main()
