"""The adaptive GAN weight per group (loss.adaptive_weight_groups): how much it differs from one weight for the
whole micro-batch, and what it costs.

    python -m benchmarks.adaptive_weight [--seeds 3] [--gains 1,100] [--skip-sd-vae] [--skip-cost]

Weights: configs/sdvae_ft.py:tiny (random tiny KL-VAE, taming-init PatchGAN with BatchNorm groups of 10, random
LPIPS at weight 1 with dropout, as the recipe) at 32 px with a micro-batch of 80 demo-photo crops on 8 (fake CPU)
devices. Per seed and branch, the job's own `generator_grads` with adaptive_weight_groups=1 (one weight from
the whole batch: the code before the per-group weight) and 0 (one per 10 images, the reference's per-GPU
weight): the single weight, the mean / min / max of the 8 group weights, and their ratio. A freshly initialised
D gives tiny logits, so many weights sit at the clip (0.5 * 1e4); `--gains` also runs D with its last kernel
scaled (the GAN gradients scale by the gain, the weights by 1/gain, their ratios stay, unless clipped).

Cost: XLA's cost analysis of the job's generator step (`compile_steps`, plain branch) with 1 group, 8 groups
(D statistics in the same 8 groups: one shared D backward, 2 x 8 masked last-layer weight gradients) and 8
groups over whole-batch D statistics (the fallback: 8 D backwards). Tiny: compiled for the 8 CPU devices
(FLOPs and temporary memory per device). SD-VAE at 256 px, batch 80 (`--skip-sd-vae` to leave out): lowered
only (global FLOPs of the unoptimised program; nothing is compiled or allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from configs import sdvae_ft  # noqa: E402
from eqvae_jax.data.iterator import build_train_iterator  # noqa: E402
from eqvae_jax.losses import equivariance as eq  # noqa: E402
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh  # noqa: E402
from eqvae_jax.train.eqvae import job as eqvae_job  # noqa: E402
from eqvae_jax.train.eqvae import steps as eqvae_steps  # noqa: E402
from eqvae_jax.train.eqvae.config import disc_stats_groups, parse_config  # noqa: E402
from eqvae_jax.train.eqvae.networks import abstract_networks  # noqa: E402

BATCH = 80
_GRADS: dict = {}  # jitted generator_grads per (groups, branch)
BRANCHES = {
    "plain": eq.Draw(eq.Branch.PLAIN, (16, 16), 16),
    "lowres 1/2": eq.Draw(eq.Branch.LOWRES, (8, 8), 16),
    "equivariance 1/2 rot90": eq.Draw(eq.Branch.EQUIVARIANCE, (8, 8), 16, 1),
}
# (label, loss.adaptive_weight_groups, disc.stats_groups); 0 = the default (BatchNorm groups of 10 -> 8 groups)
SETTINGS = (("1 group (before)", 1, 0), ("8 groups, shared D backward", 0, 0), ("8 groups, 8 D backwards", 8, 1))


def tiny_config(seed: int, data_dir: str, groups: int = 0, stats_groups: int = 0):
    c = sdvae_ft.get_config("tiny")
    c.seed = c.model.seed = seed
    c.global_batch_size = BATCH
    c.lpips.weights, c.loss.perceptual_weight = "random", 1.0
    c.loss.adaptive_weight_groups, c.disc.stats_groups = groups, stats_groups
    c.data.data_dir = data_dir
    c.compilation_cache_dir = os.path.join(data_dir, "jax_cache")
    return parse_config(c)


def _scale_last_kernel(disc: nnx.State, gain: float) -> nnx.State:
    last = f"convs/{max(int(k) for k in disc['convs'])}/kernel"
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v * gain if "/".join(str(getattr(p, "key", p)) for p in path).startswith(last) else v, disc)


def weights_table(seeds: int, data_dir: str, gain: float) -> None:
    print(f"adaptive GAN weight, configs/sdvae_ft.py:tiny at 32 px, micro-batch {BATCH} on {jax.device_count()} "
          f"devices, D statistics per 10 images, D's last kernel x {gain:g}")
    print(f"{'seed':>4} {'branch':<24}{'1 group':>10}{'8: mean':>10}{'min':>9}{'max':>9}{'1 / mean':>10}")
    ratios = []
    for seed in range(seeds):
        built = eqvae_job.build(tiny_config(seed, data_dir))
        state = built.state.replace(disc=_scale_last_kernel(built.state.disc, gain))
        data = build_train_iterator(built.config.data, built.mesh, BATCH)
        images = next(data)["image"]
        data.close()
        for name, draw in BRANCHES.items():
            plan, rot = draw.plan((32, 32))
            out = {}
            for groups in (1, 0):
                resolved = groups or built.nets.disc_stats_groups
                spec = dataclasses.replace(built.spec, loss=dataclasses.replace(built.spec.loss,
                                                                                adaptive_weight_groups=resolved))
                if (groups, name) not in _GRADS:  # one compile per setting and branch; seeds and gains reuse it
                    _GRADS[groups, name] = jax.jit(functools.partial(eqvae_steps.generator_grads, spec),
                                                   static_argnums=(5,))
                _, terms, _, _ = _GRADS[groups, name](state, built.lpips_state, images, rot, jax.random.key(seed),
                                                      plan)
                out[groups] = np.asarray(terms["d_weight_groups"])
            one, grouped = float(out[1][0]), out[0]
            ratios.append(one / grouped.mean())
            print(f"{seed:>4} {name:<24}{one:>10.4g}{grouped.mean():>10.4g}{grouped.min():>9.4g}{grouped.max():>9.4g}"
                  f"{one / grouped.mean():>10.3f}")
    print(f"ratio (1 group) / (mean of 8): mean {np.mean(ratios):.3f}, min {np.min(ratios):.3f}, "
          f"max {np.max(ratios):.3f} over {len(ratios)} (seed, branch) pairs\n")


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


def _generator_lowered(config, abstract: bool):
    mesh = make_mesh(-1, 1)
    if abstract:
        nets = abstract_networks(config, disc_stats_groups(config, batch_divisor(mesh)))
        spec = eqvae_steps.make_spec(config, nets)
        state = jax.eval_shape(lambda *a: eqvae_steps.initial_state(spec, *a), nets.vae_params, nets.disc_params,
                               nets.disc_stats)
        lpips_state = nets.lpips_state
    else:
        built = eqvae_job.build(config)
        spec, state, lpips_state = built.spec, built.state, built.lpips_state
    steps = eqvae_steps.compile_steps(spec, state, lpips_state, mesh)
    size = config.data.image_size
    images = jax.ShapeDtypeStruct((config.global_batch_size, size, size, 3), jnp.float32)
    plan = eq.BranchPlan(eq.Branch.PLAIN)
    return steps.generator.lower(state, lpips_state, images, jax.ShapeDtypeStruct((), jnp.int32),
                                 jax.eval_shape(lambda: jax.random.key(0)), plan)


def cost_table(data_dir: str, sd_vae: bool) -> None:
    print("generator step (plain branch), XLA cost analysis")
    print(f"{'model':<26}{'setting':<30}{'GFLOP':>12}{'vs 1 group':>12}{'temp MiB/dev':>14}{'s':>7}")
    rows = [("tiny 32 px, batch 80", s) for s in SETTINGS]
    if sd_vae:
        rows += [("SD-VAE 256 px, batch 80", s) for s in SETTINGS]
    base: dict[str, float] = {}
    for model, (label, groups, stats) in rows:
        t0 = time.perf_counter()
        if model.startswith("tiny"):
            lowered = _generator_lowered(tiny_config(0, data_dir, groups, stats), abstract=False)
            compiled = lowered.compile()
            flops = _flops(compiled.cost_analysis()) * jax.device_count()  # per device x devices
            temp = f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f}"
        else:
            c = sdvae_ft.get_config()
            c.model.init, c.model.preset, c.lpips.weights = "random", "sd_vae", "random"
            c.loss.adaptive_weight_groups, c.disc.stats_groups = groups, stats
            flops, temp = _flops(_generator_lowered(parse_config(c), abstract=True).cost_analysis()), "-"
        base.setdefault(model, flops)
        print(f"{model:<26}{label:<30}{flops / 1e9:>12.1f}{flops / base[model] - 1:>+12.2%}{temp:>14}"
              f"{time.perf_counter() - t0:>7.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-sd-vae", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--gains", default="1,100", help="D last-kernel gains for the weights table")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "eqvae_bench_adaptive_weight"))
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)\n")
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.data_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    for gain in (float(g) for g in args.gains.split(",")):
        weights_table(args.seeds, args.data_dir, gain)
    if not args.skip_cost:
        cost_table(args.data_dir, not args.skip_sd_vae)


if __name__ == "__main__":
    main()
