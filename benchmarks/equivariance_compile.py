"""Compile time per static variant of the EQ-VAE generator step, and the cost of the adaptive GAN weight.

    python -m benchmarks.equivariance_compile          # from the repo root: tiny KL-VAE, 128 px, 6 buckets
    python -m benchmarks.equivariance_compile --model sd_vae --size 256 --batch 1 --buckets plain,eq24

For each bucket (a `BranchPlan`), the jitted G step (value_and_grad of `transformed_generator_loss` w.r.t. the VAE
parameters, real LPIPS and PatchGAN) and D step are lowered and compiled ahead of time on abstract inputs (no
weights are materialised, nothing runs) and the seconds are printed as a table. `--flops` adds XLA's cost
analysis of the G step with and without the adaptive weight (disc_factor=0 skips it), i.e. its overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from eqvae_jax.losses import autoencoder as ae  # noqa: E402
from eqvae_jax.losses import equivariance as eq  # noqa: E402
from eqvae_jax.models import discriminator, kl_vae, lpips  # noqa: E402

BUCKETS = {
    "plain": eq.Draw(eq.Branch.PLAIN, (32, 32), 32),
    **{f"low{k}": eq.Draw(eq.Branch.LOWRES, (k, k), 32) for k in range(8, 32)},
    **{f"eq{k}": eq.Draw(eq.Branch.EQUIVARIANCE, (k, k), 32, 1) for k in range(8, 32)},
}


def build_steps(vae_cfg: kl_vae.KLVAEConfig, loss_cfg: ae.LossConfig):
    """Abstract models and the jitted G/D steps in the train-step pattern (plan static, merge inside)."""
    vae = kl_vae.abstract(vae_cfg)
    lp = lpips.abstract_lpips()
    disc = discriminator.abstract_discriminator()
    vgd, vparams = nnx.split(vae)
    lgd, lstate = nnx.split(lp)
    dgd, dparams, dstats = nnx.split(disc, nnx.Param, nnx.BatchStat)

    def g_step(vparams, dparams, dstats, lstate, x, plan, rot_k, key, step):
        def loss_fn(p):
            v = nnx.merge(vgd, p, copy=True)
            d = nnx.merge(dgd, dparams, dstats, copy=True)
            m = nnx.merge(lgd, lstate, copy=True)
            total, terms, pair = eq.transformed_generator_loss(v, m, d, x, plan, rot_k, key, step, loss_cfg)
            return total, (terms, pair, nnx.state(d, nnx.BatchStat))

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(vparams)
        return aux, grads

    def d_step(dparams, dstats, target, recon, step):
        def loss_fn(p):
            d = nnx.merge(dgd, p, dstats, copy=True)
            loss, terms = ae.discriminator_loss(d, target, recon, step, loss_cfg)
            return loss, (terms, nnx.state(d, nnx.BatchStat))

        return jax.value_and_grad(loss_fn, has_aux=True)(dparams)

    states = (vparams, dparams, dstats, lstate)
    return jax.jit(g_step, static_argnames=("plan",)), jax.jit(d_step), states


def compile_bucket(g, d, states, plan: eq.BranchPlan, batch: int, size: int) -> dict[str, float]:
    vparams, dparams, dstats, lstate = states
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    lowered = g.lower(vparams, dparams, dstats, lstate, x, plan, i32, key, i32)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    h, w = plan.image_shape((size, size))
    img = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    d.lower(dparams, dstats, img, img, i32).compile()
    t3 = time.perf_counter()
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    return {"g_lower_s": t1 - t0, "g_compile_s": t2 - t1, "d_total_s": t3 - t2, "g_flops": flops}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(kl_vae.PRESETS))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--buckets", default="plain,low8,low31,eq8,eq20,eq31", help=f"any of {', '.join(BUCKETS)}")
    p.add_argument("--flops", action="store_true", help="also compile without the adaptive weight")
    args = p.parse_args()

    vae_cfg = kl_vae.PRESETS[args.model]()
    print(f"model {args.model}, {args.size}px, batch {args.batch}, backend {jax.default_backend()}")
    bound = len(eq.all_plans(eq.TransformConfig(), (args.size, args.size)))
    print(f"compiled G-step variants for the reference transform config: {bound}")
    g, d, states = build_steps(vae_cfg, ae.LossConfig())
    if args.flops:
        g0, _, _ = build_steps(vae_cfg, dataclasses.replace(ae.LossConfig(), disc_factor=0.0))
    print(f"{'bucket':<24}{'G lower s':>10}{'G xla s':>10}{'D total s':>10}{'G GFLOP':>10}{'no-adapt GFLOP':>16}")
    for name in args.buckets.split(","):
        plan, _ = BUCKETS[name].plan((args.size, args.size))
        r = compile_bucket(g, d, states, plan, args.batch, args.size)
        extra = ""
        if args.flops:
            extra = f"{compile_bucket(g0, d, states, plan, args.batch, args.size)['g_flops'] / 1e9:>16.2f}"
        print(
            f"{str(plan):<24}{r['g_lower_s']:>10.2f}{r['g_compile_s']:>10.2f}{r['d_total_s']:>10.2f}"
            f"{r['g_flops'] / 1e9:>10.2f}{extra}",
            flush=True,
        )


if __name__ == "__main__":
    main()
