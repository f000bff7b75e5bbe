"""Compile time of the EQ-VAE job's real generator and discriminator steps, one program per (branch, scale).

    python -m benchmarks.equivariance_compile [--model tiny] [--size 128] [--batch 2] [--buckets plain,eq8,...]

The steps are the job's own (`train.eqvae.steps.compile_steps` on abstract networks, LPIPS included), lowered
and compiled for the local backend without running; prints lowering and XLA seconds per bucket and the XLA
FLOPs of the generator program.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from configs import sdvae_ft
from eqvae_jax.losses import equivariance as eq
from eqvae_jax.models import kl_vae
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh
from eqvae_jax.train.eqvae import steps as eqvae_steps
from eqvae_jax.train.eqvae.config import disc_stats_groups, parse_config
from eqvae_jax.train.eqvae.networks import abstract_networks

BUCKETS = {
    "plain": eq.Draw(eq.Branch.PLAIN, (32, 32), 32),
    **{f"low{k}": eq.Draw(eq.Branch.LOWRES, (k, k), 32) for k in range(8, 32)},
    **{f"eq{k}": eq.Draw(eq.Branch.EQUIVARIANCE, (k, k), 32, 1) for k in range(8, 32)},
}


def abstract_steps(model: str, size: int, batch: int):
    """(jitted steps, abstract state, abstract LPIPS state, d-pair flag) of configs/sdvae_ft.py on this host."""
    config = sdvae_ft.get_config()
    config.model.init, config.model.preset = "random", model
    config.lpips.weights = "random"
    config.data.image_size, config.global_batch_size = size, batch
    config.mesh.data = 1
    config.transform.scale_numerators = [8]  # only the shape checks: any bucket below compiles
    config = parse_config(config, num_devices=jax.device_count())
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    nets = abstract_networks(config, disc_stats_groups(config, batch_divisor(mesh)))
    spec = eqvae_steps.make_spec(config, nets)
    state = jax.eval_shape(lambda *a: eqvae_steps.initial_state(spec, *a), nets.vae_params, nets.disc_params,
                           nets.disc_stats)
    return eqvae_steps.compile_steps(spec, state, nets.lpips_state, mesh), state, nets.lpips_state


def compile_bucket(steps, state, lpips_state, plan: eq.BranchPlan, batch: int, size: int) -> dict[str, float]:
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    rot = jax.ShapeDtypeStruct((), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    lowered = steps.generator.lower(state, lpips_state, x, rot, key, plan)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    steps.discriminator.lower(state, x, rot, key, None, plan).compile()
    t3 = time.perf_counter()
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    return {"g_lower_s": t1 - t0, "g_compile_s": t2 - t1, "d_total_s": t3 - t2, "g_flops": flops}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(kl_vae.PRESETS))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--buckets", default="plain,low8,low31,eq8,eq20,eq31", help=f"any of {', '.join(BUCKETS)}")
    args = p.parse_args()

    print(f"model {args.model}, {args.size}px, batch {args.batch}, backend {jax.default_backend()}")
    bound = len(eq.all_plans(eq.TransformConfig(), (args.size, args.size)))
    print(f"compiled G-step variants for the reference transform config: {bound}")
    steps, state, lpips_state = abstract_steps(args.model, args.size, args.batch)
    print(f"{'bucket':<24}{'G lower s':>10}{'G xla s':>10}{'D total s':>10}{'G GFLOP':>10}")
    for name in args.buckets.split(","):
        plan, _ = BUCKETS[name].plan((args.size, args.size))
        r = compile_bucket(steps, state, lpips_state, plan, args.batch, args.size)
        print(f"{str(plan):<24}{r['g_lower_s']:>10.2f}{r['g_compile_s']:>10.2f}{r['d_total_s']:>10.2f}"
              f"{r['g_flops'] / 1e9:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
