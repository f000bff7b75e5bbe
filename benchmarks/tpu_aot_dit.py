"""Ahead-of-time TPU compile of the real DiT-XL/2 train step (global batch 256) on this CPU machine.

    pip install --target /opt/libtpu_aot -r requirements-tpu-aot.txt   # libtpu's compiler, not in CPU CI
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.tpu_aot_dit [--model XL/2] [--batch 256] [--remat both]

For each target slice (v4-8, v5p-8, v5e-16, v6e-8) the step of `eqvae_jax.train.dit_steps` (posterior sample,
DDPM hybrid loss, AdamW, EMA, non-finite guard; bf16 matmuls; FSDP over all chips of the slice, the job's
default) is lowered against a compile-only TPU topology and compiled by libtpu. Reported per chip: XLA's
memory analysis (arguments + outputs - donated aliases + temporaries) against the chip's HBM, and the step
time implied at 40% MFU from the model FLOPs. XLA's `cost_analysis()` counts a lax.scan body once (the 28
blocks are scanned), so the FLOPs come from `dit_flops` (2 x MACs, train = 3 x forward); XLA's count is shown
for reference. Compared with the DiT paper's TPU v3-256 rate (5.7 it/s at batch 256).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend stays CPU; TPUs are compile-only topologies
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.tpu_aot_common import (  # noqa: E402
    GIB,
    V4_8,
    V5E_16,
    V5P_8,
    V6E_8,
    Target,
    abstract_key,
    batch_sharding,
    compile_report,
    topology_mesh,
)
from eqvae_jax.models.dit import dit_flops  # noqa: E402
from eqvae_jax.parallel.mesh import replicated  # noqa: E402
from eqvae_jax.train.dit import state as dit_state  # noqa: E402
from eqvae_jax.train.dit.config import defaults, parse_config  # noqa: E402
from eqvae_jax.train.dit.steps import make_train_step  # noqa: E402

TARGETS = (V4_8, V5P_8, V5E_16, V6E_8)
MFU = 0.4
DIT_V3_STEPS_PER_S = 5.7  # DiT paper, TPU v3-256 (128 chips), DiT-XL/2, global batch 256


def job_config(model: str, batch: int, remat: bool):
    config = defaults()
    size, patch = model.split("/")
    config.model.size, config.model.patch, config.model.remat = size, int(patch), remat
    config.global_batch_size = batch
    return config


def compile_step(target: Target, config, latent_shape: tuple[int, int, int] = (32, 32, 4)) -> dict:
    """The job's train step for `config` on latents of `latent_shape` (H, W, C; SD-VAE's at 256 px by default)."""
    mesh = topology_mesh(target)
    config = parse_config(config, num_devices=target.chips, check_cache=False)
    cfg = config.dit_config(latent_shape)
    tx = dit_state.make_optimizer(config.optim)
    state = dit_state.abstract_state(cfg, config.seed, tx, mesh, config.fsdp_min_size)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    model = dit_state.functional_model(cfg, config.seed)  # the fixed position table: a host constant
    step = make_train_step(model, tx, config, mesh, shardings)

    b, sharded = config.global_batch_size, batch_sharding(mesh)
    lat = jax.ShapeDtypeStruct((b, *latent_shape), jnp.float32, sharding=sharded)
    batch = {"mean": lat, "std": lat, "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
    factors = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated(mesh))  # latent_factors(scale, shift)
    return compile_report(step, (state, batch, abstract_key(), factors), target, dit_flops(cfg, b, train=True), MFU)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="XL/2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--remat", choices=("off", "on", "both"), default="both")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS))
    args = parser.parse_args()
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    v3_step = 1.0 / DIT_V3_STEPS_PER_S
    print(f"DiT-{args.model} train step (bf16 matmuls, f32 params/AdamW/EMA), global batch {args.batch}, "
          f"FSDP over every chip; jax {jax.__version__}")
    print(f"DiT paper TPU v3-256: {DIT_V3_STEPS_PER_S} it/s = {v3_step:.3f} s/step on 128 chips")
    header = (f"{'slice':<8}{'remat':>6}{'HBM/chip':>10}{'args':>8}{'temp':>8}{'total':>8}{'fits':>6}"
              f"{'model TF':>10}{'XLA TF*':>9}{'s@40%':>8}{'it/s@40%':>9}{'vs v3-256':>10}{'compile':>9}")
    print(header)
    for target in TARGETS:
        if target.name not in args.targets.split(","):
            continue
        for remat in remats:
            try:
                r = compile_step(target, job_config(args.model, args.batch, remat))
            except Exception as e:  # report and continue with the other targets
                first = str(e).splitlines()[0]
                if "RESOURCE_EXHAUSTED" in first:  # the TPU compiler refuses a program that cannot fit
                    print(f"{target.name:<8}{'on' if remat else 'off':>6}  does NOT fit: {first[:160]}")
                else:
                    print(f"{target.name:<8}{'on' if remat else 'off':>6}  FAILED: {type(e).__name__}: {first[:200]}")
                continue
            print(f"{target.name:<8}{'on' if remat else 'off':>6}{target.hbm_bytes / GIB:>9.1f}G"
                  f"{r['args_gib']:>7.1f}G{r['temp_gib']:>7.1f}G{r['per_chip_gib']:>7.1f}G"
                  f"{'yes' if r['fits'] else 'NO':>6}{r['model_tflop']:>10.1f}{r['xla_tflop']:>9.1f}"
                  f"{r['step_s']:>8.3f}{1 / r['step_s']:>9.2f}{v3_step / r['step_s']:>9.2f}x"
                  f"{r['compile_s']:>8.0f}s", flush=True)
    print("* XLA cost_analysis FLOPs x chips: the scanned block body is counted once, not depth times.")


if __name__ == "__main__":
    main()
