"""Ahead-of-time TPU compile of the real MaskGIT train step (the paper's 24-layer, 768-wide model) on this CPU.

    pip install --target /opt/libtpu_aot -r requirements-tpu-aot.txt   # libtpu's compiler, not in CPU CI
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.tpu_aot_maskgit [--batch 256,512] [--remat off]

For each target slice (v4-8, v5p-8, v5e-8, v6e-8) the step of `eqvae_jax.train.maskgit.steps` as the job builds
it from configs/maskgit.py (valeoai v1's recipe: arccos masking, 10% label drop, dropout 0.1, label-smoothed
cross-entropy over all 256 tokens, clip 1.0 + AdamW, non-finite guard; bf16 matmuls; params, AdamW moments in
f32; no EMA, as v1; FSDP over every chip of the slice) is lowered against a compile-only TPU topology and
compiled by libtpu, at each global batch. Reported per chip: XLA's memory analysis (arguments + outputs - donated
aliases + temporaries) against the chip's HBM, and the step time implied at 40% MFU from the model FLOPs
(`maskgit_flops`: 2 x MACs of the matmuls, attention included, train = 3 x forward). XLA's `cost_analysis()`
counts a lax.scan body once (the 24 blocks are scanned), so its count, shown for reference, is low. 300 epochs
of ImageNet at batch 512 are 750,600 updates; the table gives the days that takes at 40% MFU.
"""

from __future__ import annotations

import argparse
import os
import re

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
)
from eqvae_jax.models.maskgit import maskgit_flops  # noqa: E402
from eqvae_jax.train.maskgit import state as mg_state  # noqa: E402
from eqvae_jax.train.maskgit.config import defaults, parse_config  # noqa: E402
from eqvae_jax.train.maskgit.steps import make_train_step  # noqa: E402

TARGETS = (V4_8, V5P_8, V5E_8, V6E_8)
MFU = 0.4
IMAGENET_TRAIN = 1_281_167
EPOCHS = 300
CODES, GRID = 1024, 16  # the taming f16 n1024 VQGAN's tokens at 256 px
_TEMPS = re.compile(r"required for HLO temporaries \(([0-9.]+)G\)")


def job_config(batch: int, remat: bool):
    config = defaults()  # configs/maskgit.py's values: the base preset, bf16, v1's recipe
    config.global_batch_size = batch
    config.model.remat = remat
    return config


def compile_step(target: Target, config, codes: int = CODES, grid: int = GRID) -> dict:
    """The job's train step for `config` on `grid` x `grid` tokens of a `codes`-entry codebook."""
    mesh = topology_mesh(target)
    config = parse_config(config, num_devices=target.chips, check_cache=False)
    cfg = config.maskgit_config(codes, grid)
    tx = mg_state.make_optimizer(config.optim)
    state = mg_state.abstract_state(cfg, tx, mesh, config.fsdp_min_size, config.ema.enabled)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    step = make_train_step(mg_state.functional_model(cfg), tx, config, mesh, shardings)

    b, sharded = config.global_batch_size, batch_sharding(mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((b, grid, grid), jnp.int32, sharding=sharded),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
    report = compile_report(step, (state, batch, abstract_key()), target, maskgit_flops(cfg, b, train=True), MFU)
    return {**report, "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="256,512", help="global batch sizes, comma-separated")
    parser.add_argument("--remat", choices=("off", "on", "both", "auto"), default="auto",
                        help="auto: without remat, and with it only where that does not fit")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS))
    args = parser.parse_args()
    remats = {"off": [False], "on": [True], "both": [False, True], "auto": [False, True]}[args.remat]
    batches = [int(b) for b in args.batch.split(",")]
    print(f"MaskGIT base (24 layers, width 768, 16 heads, MLP 3072; 256 + 1 tokens, 1024 codes) train step, "
          f"bf16 matmuls, f32 params/AdamW, FSDP over every chip; jax {jax.__version__}")
    header = (f"{'slice':<8}{'batch':>6}{'remat':>6}{'HBM/chip':>10}{'args':>8}{'temp':>8}{'total':>8}{'fits':>6}"
              f"{'model TF':>10}{'XLA TF*':>9}{'s@40%':>8}{'it/s@40%':>9}{'300 ep':>8}{'compile':>9}")
    print(header)
    for target in TARGETS:
        if target.name not in args.targets.split(","):
            continue
        for batch in batches:
            for remat in remats:
                row = f"{target.name:<8}{batch:>6}{'on' if remat else 'off':>6}"
                try:
                    r = compile_step(target, job_config(batch, remat))
                except Exception as e:  # report and continue with the other targets
                    first = str(e).splitlines()[0]
                    if is_out_of_memory(e):
                        used = hbm_used_from_error(str(e))
                        temps = _TEMPS.search(str(e))
                        need = (f"needs {used:.1f} GiB" if used is not None else
                                f"temporaries alone {temps.group(1)} GiB" if temps else first[:160])
                        print(f"{row}{target.hbm_bytes / GIB:>9.1f}G  does NOT fit: {need}", flush=True)
                    else:
                        print(f"{row}  FAILED: {type(e).__name__}: {first[:200]}", flush=True)
                    continue
                days = EPOCHS * (IMAGENET_TRAIN // batch) * r["step_s"] / 86400
                print(f"{row}{target.hbm_bytes / GIB:>9.1f}G{r['args_gib']:>7.2f}G{r['temp_gib']:>7.2f}G"
                      f"{r['per_chip_gib']:>7.2f}G{'yes' if r['fits'] else 'NO':>6}{r['model_tflop']:>10.1f}"
                      f"{r['xla_tflop']:>9.1f}{r['step_s']:>8.3f}{1 / r['step_s']:>9.2f}{days:>7.1f}d"
                      f"{r['compile_s']:>8.0f}s", flush=True)
                if args.remat == "auto" and r["fits"]:
                    break
    print("* XLA cost_analysis FLOPs x chips: the scanned block body is counted once, not depth times.")
    print("300 ep: 300 epochs of ImageNet (300 x floor(1,281,167 / batch) updates) at 40% MFU.")


if __name__ == "__main__":
    main()
