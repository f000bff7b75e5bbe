"""Ahead-of-time TPU compile of the SiT-XL/2 + REPA train step (global batch 256) on this CPU machine.

    pip install --no-deps --target /opt/libtpu_aot -r requirements-tpu-aot.txt   # libtpu's compiler
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.tpu_aot_repa [--targets v4-8,...] [--variants ...]

The job's real step (`train.dit.steps.make_train_step` with `configs/sit.py:model=XL/2,repa`: posterior
sample, SiT velocity loss, projector on the tokens after block 8, projection loss, AdamW with clipping, EMA,
non-finite guard; bf16 matmuls; FSDP over every chip of the slice) is lowered on abstract inputs and compiled
by libtpu for each slice. Variants:

  sit        the same SiT-XL/2 recipe without REPA (the baseline);
  sit-tap    that baseline with the block-8 tap taken (tokens enter the loss with weight 0): its memory
             against `sit` is what the tap costs;
  repa-feat  REPA with the teacher's tokens given in the batch (B, 256, 768) bf16: the data path that stores
             DINOv2 features in the cache (no teacher FLOPs, 393,216 B per image);
  repa       REPA with DINOv2-B/14 running on the batch's uint8 256 px crops (the implemented data path,
             196,608 B per image), teacher replicated (`repa-fsdp`: teacher FSDP-sharded).

`--remat auto` compiles without rematerialisation and retries with it when the compiler refuses the program.
Reported per chip: XLA's memory analysis against HBM, the model FLOPs (XLA's `cost_analysis()` counts a
lax.scan body once, so FLOPs come from `dit_flops` + `dinov2_flops`; XLA's count is shown for reference) and
the step time they imply at 40% MFU. `--teacher-check` compiles the teacher forward alone with 1 block, where
XLA's count covers the whole program, against `dinov2_flops` (verifying the teacher's share).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend stays CPU; TPUs are compile-only topologies
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.tpu_aot_common import (  # noqa: E402
    GIB,
    V4_8,
    V5E_8,
    V5P_8,
    V6E_8,
    Target,
    abstract_key,
    batch_sharding,
    compile_report,
    hbm_used_from_error,
    is_out_of_memory,
    topology_mesh,
    xla_flops,
)
from configs import sit  # noqa: E402
from eqvae_jax.models import dinov2, repa  # noqa: E402
from eqvae_jax.models.dinov2 import dinov2_flops  # noqa: E402
from eqvae_jax.models.dit import FunctionalDiT, dit_flops  # noqa: E402
from eqvae_jax.parallel.mesh import replicated  # noqa: E402
from eqvae_jax.train.dit import state as dit_state  # noqa: E402
from eqvae_jax.train.dit.config import parse_config  # noqa: E402
from eqvae_jax.train.dit.steps import make_train_step  # noqa: E402

TARGETS = (V4_8, V5P_8, V5E_8, V6E_8)
VARIANTS = ("sit", "sit-tap", "repa-feat", "repa", "repa-fsdp")
MFU = 0.4
LATENT = (32, 32, 4)  # 256 px images through an f8 VAE
IMAGE = 256


@dataclasses.dataclass(frozen=True)
class TappedDiT(FunctionalDiT):
    """The model with the REPA tap taken but unused (tokens enter the output with weight 0, so XLA keeps them)."""

    tap: int = 8

    def apply(self, params, x, t, y, **kw):
        out, tokens = super().apply(params, x, t, y, tap=self.tap, **kw)
        return out + 0.0 * jnp.mean(tokens)


def job_config(variant: str, batch: int, remat: bool, teacher_dtype: str):
    config = sit.get_config("model=XL/2" + (",repa" if variant.startswith("repa") else ""))
    if not variant.startswith("repa"):  # the REPA recipe's SiT without REPA
        config.model.learn_sigma = False
        config.optim.grad_clip = 1.0
    else:
        config.repa.teacher = "random"  # shapes only; nothing is loaded
        config.repa.teacher_preset = "vitb14"
        config.repa.teacher_dtype = teacher_dtype
        config.repa.teacher_sharding = "fsdp" if variant == "repa-fsdp" else "replicated"
    config.model.remat = remat
    config.global_batch_size = batch
    return config


def compile_step(target: Target, variant: str, config) -> dict[str, Any]:
    mesh = topology_mesh(target)
    config = parse_config(config, num_devices=target.chips, check_cache=False)
    cfg = config.dit_config(LATENT)
    tx = dit_state.make_optimizer(config.optim)
    state = dit_state.abstract_state(cfg, config.seed, tx, mesh, config.fsdp_min_size)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    model = dit_state.functional_model(cfg, config.seed)
    if variant == "sit-tap":
        model = TappedDiT(model.graphdef, model.rest, model.config, tap=config.repa.encoder_depth)
    b, bs = config.global_batch_size, batch_sharding(mesh)
    lat = jax.ShapeDtypeStruct((b, *LATENT), jnp.float32, sharding=bs)
    batch = {"mean": lat, "std": lat, "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bs)}
    flops = dit_flops(cfg, b, train=True)
    factors = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated(mesh))  # latent_factors(scale, shift)
    args: tuple = (state, batch, abstract_key(), factors)
    teacher_shardings = None
    if variant.startswith("repa"):
        tcfg = config.teacher_config()
        tokens = (cfg.input_size // cfg.patch_size) ** 2
        if variant == "repa-feat":
            batch["teacher_features"] = jax.ShapeDtypeStruct((b, tokens, tcfg.hidden_size), jnp.bfloat16, sharding=bs)
        else:
            batch["image"] = jax.ShapeDtypeStruct((b, IMAGE, IMAGE, 3), jnp.uint8, sharding=bs)
            teacher = dit_state.abstract_teacher(tcfg, mesh, config.repa.teacher_sharding, config.fsdp_min_size)
            teacher_shardings = jax.tree.map(lambda a: a.sharding, teacher)
            args += (teacher,)
            size = repa.teacher_input_size(cfg.input_size // cfg.patch_size, tcfg.patch_size)
            flops += dinov2_flops(tcfg, size, b)
    step = make_train_step(model, tx, config, mesh, shardings, teacher_shardings)
    return compile_report(step, args, target, flops, MFU)

def teacher_check(target: Target, batch: int, dtype: str) -> None:
    """XLA's FLOPs of the 1-block teacher forward (all of it visible to cost_analysis) vs dinov2_flops."""
    mesh = topology_mesh(target)
    bs = batch_sharding(mesh)
    for depth in (1, 2):
        tcfg = dinov2.preset("vitb14", depth=depth, compute_dtype=dtype)
        teacher = dit_state.abstract_teacher(tcfg, mesh, "replicated", 2**14)
        images = jax.ShapeDtypeStruct((batch, IMAGE, IMAGE, 3), jnp.uint8, sharding=bs)
        fn = jax.jit(lambda t, x: repa.teacher_features(t.model(), x, 224), out_shardings=bs)
        compiled = fn.lower(teacher, images).compile()
        print(f"teacher check {target.name}: DINOv2-B/14 with {depth} block(s) (scan body counted once by XLA), "
              f"batch {batch}: XLA {xla_flops(compiled) * target.chips / 1e12:.2f} TFLOP, dinov2_flops "
              f"{dinov2_flops(tcfg, 224, batch) / 1e12:.2f} TFLOP (matmuls only)", flush=True)
    full = dinov2_flops(dinov2.preset("vitb14"), 224, 1)
    print(f"DINOv2-B/14 at 224 px: {full / 1e9:.1f} GFLOP per image (forward)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--remat", choices=("off", "on", "auto"), default="auto")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS))
    parser.add_argument("--variants", default="sit,repa-feat,repa")
    parser.add_argument("--teacher-dtype", default="bfloat16")
    parser.add_argument("--teacher-check", action="store_true")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known {VARIANTS}")
    print(f"SiT-XL/2 + REPA train step (bf16 matmuls, teacher {args.teacher_dtype}, f32 params/AdamW/EMA), global "
          f"batch {args.batch}, FSDP over every chip; jax {jax.__version__}; one line per compile", flush=True)
    header = (f"{'slice':<8}{'variant':<11}{'remat':>6}{'HBM':>8}{'args':>8}{'temp':>8}{'total':>8}{'fits':>6}"
              f"{'model TF':>10}{'XLA TF*':>9}{'s@40%':>8}{'compile':>9}")
    print(header, flush=True)
    for target in TARGETS:
        if target.name not in args.targets.split(","):
            continue
        if args.teacher_check:
            teacher_check(target, args.batch, args.teacher_dtype)
        for variant in variants:
            remats = {"off": [False], "on": [True], "auto": [False, True]}[args.remat]
            for remat in remats:
                label = f"{target.name:<8}{variant:<11}{'on' if remat else 'off':>6}"
                start = time.perf_counter()
                try:
                    r = compile_step(target, variant, job_config(variant, args.batch, remat, args.teacher_dtype))
                except Exception as e:  # report and continue
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    took = time.perf_counter() - start
                    if is_out_of_memory(e):
                        used = hbm_used_from_error(str(e))
                        need = f"needs {used:.1f} GiB" if used else first[:120]
                        print(f"{label}  does NOT fit ({need}); compile {took:.0f}s", flush=True)
                        continue  # auto: retry with remat
                    print(f"{label}  FAILED: {type(e).__name__}: {first[:200]}", flush=True)
                    break
                print(f"{label}{target.hbm_bytes / GIB:>7.1f}G{r['args_gib']:>7.1f}G{r['temp_gib']:>7.1f}G"
                      f"{r['per_chip_gib']:>7.1f}G{'yes' if r['fits'] else 'NO':>6}{r['model_tflop']:>10.1f}"
                      f"{r['xla_tflop']:>9.1f}{r['step_s']:>8.3f}{r['compile_s']:>8.0f}s", flush=True)
                if r["fits"]:
                    break
    print("* XLA cost_analysis FLOPs x chips: each scanned block body is counted once, not depth times.")


if __name__ == "__main__":
    main()
