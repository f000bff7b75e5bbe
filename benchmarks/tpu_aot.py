"""Ahead-of-time TPU compile of the EQ fine-tuning step on this CPU machine: the EQ-VAE job on SD-VAE
(configs/sdvae_ft.py, `--job eqvae`) or the EQ-VQGAN job on taming's f16 VQGAN (configs/vqgan_ft.py,
`--job eqvqgan`), both at 256 px.

    pip install --no-deps --target /opt/libtpu_aot -r requirements-tpu-aot.txt   # libtpu's compiler
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.tpu_aot [--job eqvae|eqvqgan] [--batch 80]
        [--dtype float32] [--targets v4-8,...] [--programs g:plain,g:eq24,d:plain]

The job's real jitted steps (`eqvae_steps.compile_steps`: generator and discriminator micro-step, donated state,
in/out shardings on the ('data', 'fsdp') mesh, pure data parallel as the config says) are lowered on abstract
inputs (random-init shapes of the job's autoencoder, nothing is materialised) and compiled by libtpu for each
slice (v4-8, v5p-8, v5e-8, v6e-8). Per program and slice: XLA's per-chip memory (arguments + outputs - donated aliases +
temporaries) against HBM, XLA's FLOPs (cost_analysis per device x chips) per step and per image, and the time
and images/s that FLOPs imply at 40% MFU of the chip's bf16 peak (Cloud TPU docs; the reference step is fp32,
`--dtype bfloat16` sets config.model.dtype). A "micro-step" is one G plus one D call on the same batch.

Programs run in the order given, each on every slice, and a compile is skipped once `--time-limit` would be
passed (one compile is 1-10 minutes, depending on the host's load: about 9 CPU-minutes on a busy 2-core box).
Then, with the time left, the largest per-chip batch whose plain full-resolution G step (the
most memory-hungry program) fits: a secant search on per-chip memory vs batch, each guess verified by a
compile (a program that does not fit is refused by the compiler; its "Used X of Y hbm" is read back); with no
time left only the linear estimate (arguments + batch x the measured per-image memory) is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend stays CPU; TPUs are compile-only topologies
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compile-only runs may share this machine

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from benchmarks.tpu_aot_common import (  # noqa: E402
    GIB,
    V4_8,
    V5E_8,
    V5P_8,
    V6E_8,
    Target,
    abstract_key,
    hbm_used_from_error,
    is_out_of_memory,
    memory_report,
    step_seconds,
    topology_mesh,
    xla_flops,
)
from configs import sdvae_ft, vqgan_ft  # noqa: E402
from eqvae_jax.losses import equivariance  # noqa: E402
from eqvae_jax.parallel.mesh import batch_divisor  # noqa: E402
from eqvae_jax.train.eqvae import steps as eqvae_steps  # noqa: E402
from eqvae_jax.train.eqvae.config import FinetuneConfig, disc_stats_groups, parse_config  # noqa: E402
from eqvae_jax.train.eqvae.networks import abstract_networks  # noqa: E402

TARGETS = (V4_8, V5P_8, V5E_8, V6E_8)
MFU = 0.4
FIT_MARGIN = 0.97  # aim the batch search a little under HBM (the runtime needs some room too)


# job -> (config module, random-init preset of its autoencoder, default programs, its name in the header)
JOBS = {
    "eqvae": (sdvae_ft, "sd_vae", "g:plain,g:eq24,d:plain", "EQ-VAE sdvae_ft micro-step, SD-VAE"),
    "eqvqgan": (vqgan_ft, "taming_f16_n1024", "g:plain,g:eq12,d:plain", "EQ-VQGAN vqgan_ft micro-step, taming VQGAN "
                "f16 n1024"),
}


def job_config(batch: int, dtype: str, job: str = "eqvae") -> ConfigDict:
    """The job's config file with random-init shapes (no weight files) and the given micro-batch and dtype."""
    module, preset, _, _ = JOBS[job]
    config = module.get_config()
    config.model.init, config.model.weights, config.model.preset, config.model.dtype = "random", "", preset, dtype
    config.disc.weights = ""
    config.lpips.weights = "random"
    config.global_batch_size = batch
    return config


def parse_plan(name: str, size: int, den: int = 32) -> equivariance.BranchPlan:
    """'plain', 'lowK' or 'eqK' (scale K/den; eq with one quarter turn) -> the static BranchPlan."""
    if name == "plain":
        draw = equivariance.Draw(equivariance.Branch.PLAIN, (den, den), den)
    elif name.startswith("low"):
        k = int(name[3:])
        draw = equivariance.Draw(equivariance.Branch.LOWRES, (k, k), den)
    elif name.startswith("eq"):
        k = int(name[2:])
        draw = equivariance.Draw(equivariance.Branch.EQUIVARIANCE, (k, k), den, 1)
    else:
        raise ValueError(f"unknown branch {name!r} (plain, lowK, eqK: scale K/{den})")
    return draw.plan((size, size))[0]


class AbstractJob:
    """The job's StepSpec, jitted steps and abstract state for one slice: the job's own pieces (networks,
    spec, initial state, jitted steps) on shape-only networks and a TPU topology mesh."""

    def __init__(self, config: ConfigDict, target: Target):
        config: FinetuneConfig = parse_config(config, num_devices=target.chips)
        self.config, self.target = config, target
        mesh = topology_mesh(target, data=target.chips)  # the config's mesh: data=-1 (all chips), fsdp=1
        nets = abstract_networks(config, disc_stats_groups(config, batch_divisor(mesh)))
        spec = eqvae_steps.make_spec(config, nets)
        self.lpips_state = nets.lpips_state
        self.state = jax.eval_shape(lambda *a: eqvae_steps.initial_state(spec, *a), nets.vae_params,
                                    nets.disc_params, nets.disc_stats)
        self.steps = eqvae_steps.compile_steps(spec, self.state, self.lpips_state, mesh)
        self.return_pair = spec.return_pair
        leaves = jax.tree.leaves((self.state, self.lpips_state))
        self.state_gib = sum(x.size * x.dtype.itemsize for x in leaves) / GIB  # what does not scale with batch

    def compile(self, kind: str, plan: equivariance.BranchPlan, batch: int) -> dict[str, Any]:
        """Lower and compile the G ('g') or D ('d') step for `plan` at global `batch`; memory, FLOPs, seconds.

        A program the compiler refuses for lack of HBM returns fits=False and the memory the error reports.
        """
        size = self.config.data.image_size
        images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        rot = jax.ShapeDtypeStruct((), jnp.int32)
        key = abstract_key()
        start = time.perf_counter()
        if kind == "g":
            lowered = self.steps.generator.lower(self.state, self.lpips_state, images, rot, key, plan)
        else:
            h, w = plan.image_shape((size, size))
            pair = (jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32),) * 2 if self.return_pair else None
            lowered = self.steps.discriminator.lower(self.state, images, rot, key, pair, plan)
        lowered_at = time.perf_counter()
        out: dict[str, Any] = {"lower_s": lowered_at - start, "batch": batch}
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler refuses a program that cannot fit
            if not is_out_of_memory(e):
                raise
            out.update(fits=False, per_chip_gib=hbm_used_from_error(str(e)), compile_s=time.perf_counter() - lowered_at,
                       flops=math.nan, error=str(e).splitlines()[0])
            return out
        out["compile_s"] = time.perf_counter() - lowered_at
        out.update(memory_report(compiled))
        out["fits"] = out["per_chip_gib"] * GIB < self.target.hbm_bytes
        out["flops"] = xla_flops(compiled) * self.target.chips  # per device x chips = the whole step
        return out


def search_batch(job: AbstractJob, plan: equivariance.BranchPlan, known: list[tuple[int, float, bool]],
                 deadline: float, max_compiles: int) -> tuple[int | None, int | None, float | None, int]:
    """Largest per-chip batch whose program fits, by secant steps on (per-chip batch, GiB) points.

    `known`: (per-chip batch, per-chip GiB or NaN, fits) from compiles already made. Returns (largest verified
    fitting, smallest verified failing, linear estimate, compiles made); stops at `deadline` or `max_compiles`.
    """
    chips, hbm = job.target.chips, job.target.hbm_bytes / GIB
    points = list(known)
    compiles = 0
    estimate = None
    while True:
        ok = [b for b, _, f in points if f]
        bad = [b for b, _, f in points if not f]
        lo, hi = (max(ok) if ok else None), (min(bad) if bad else None)
        if (lo is not None and hi is not None and hi - lo <= 1) or (hi == 1):
            break
        measured = sorted((b, g) for b, g, _ in points if g is not None and not math.isnan(g))
        if len(measured) >= 2:
            (b0, g0), (b1, g1) = measured[0], measured[-1]
            slope = (g1 - g0) / (b1 - b0) if b1 != b0 else math.nan
            base = g0 - slope * b0
        elif measured:
            b1, g1 = measured[0]
            base = job.state_gib  # arguments only: everything else scales with the batch
            slope = (g1 - base) / b1
        else:
            break
        estimate = (hbm * FIT_MARGIN - base) / slope if slope > 0 else None
        if estimate is None:
            break
        guess = max(1, int(estimate))
        if lo is not None:
            guess = max(guess, lo + 1)
        if hi is not None:
            guess = min(guess, hi - 1)
        if any(b == guess for b, _, _ in points) or compiles >= max_compiles or time.perf_counter() > deadline:
            break
        print(f"  {job.target.name}: trying per-chip batch {guess} (estimate {estimate:.1f})", flush=True)
        r = job.compile("g", plan, guess * chips)
        compiles += 1
        gib = r.get("per_chip_gib")
        points.append((guess, math.nan if gib is None else gib, bool(r["fits"])))
    ok = [b for b, _, f in points if f]
    bad = [b for b, _, f in points if not f]
    return (max(ok) if ok else None), (min(bad) if bad else None), estimate, compiles


def fmt_gib(x: float | None) -> str:
    return "    ?" if x is None or math.isnan(x) else f"{x:5.1f}"


def print_row(target: Target, name: str, batch: int, r: dict[str, Any]) -> None:
    """One table row: memory, FLOPs and the implied speed at 40% MFU of one compiled program."""
    head = f"{target.name:<7}{name:<20}{batch // target.chips:>7}{target.hbm_bytes / GIB:>6.1f}G"
    if "error" in r:
        print(f"{head}  does NOT fit: needs {fmt_gib(r['per_chip_gib'])} GiB  ({r['compile_s']:.0f}s)", flush=True)
        return
    t = step_seconds(r["flops"], target, MFU)
    print(f"{head}{r['args_gib']:>6.2f}G{r['temp_gib']:>6.1f}G{r['per_chip_gib']:>6.1f}G"
          f"{'yes' if r['fits'] else 'NO':>5}{r['flops'] / 1e12:>8.1f}{r['flops'] / batch / 1e9:>8.0f}"
          f"{t:>8.3f}{batch / t:>10.0f}{r['lower_s']:>6.0f}s{r['compile_s']:>7.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="eqvae", choices=sorted(JOBS), help="eqvae (SD-VAE) or eqvqgan (VQGAN f16)")
    parser.add_argument("--batch", type=int, default=0, help="global micro-batch (default: the config's, 80)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="config.model.dtype")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS))
    parser.add_argument("--programs", default="",
                        help="comma list of g|d:BRANCH, BRANCH = plain | lowK | eqK (scale K over the config's "
                             "denominator: 32 for eqvae, 16 for eqvqgan); default g:plain,g:eq24,d:plain (eqvae), "
                             "g:plain,g:eq12,d:plain (eqvqgan)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds; the batch search stops here")
    parser.add_argument("--search-compiles", type=int, default=3,
                        help="max extra compiles per slice (0: only the linear estimate)")
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.time_limit
    targets = [t for t in TARGETS if t.name in args.targets.split(",")]
    base = job_config(args.batch or 80, args.dtype, args.job)
    batch = args.batch or base.global_batch_size
    size, den = base.data.image_size, base.transform.scale_denominator
    programs = [(p.split(":")[0], p.split(":")[1]) for p in (args.programs or JOBS[args.job][2]).split(",")]
    print(f"{JOBS[args.job][3]} {args.dtype} compute (f32 params, Adam, LPIPS-VGG, PatchGAN), "
          f"{size}px, global micro-batch {batch}, pure data parallel; jax {jax.__version__}")
    print(f"{'slice':<7}{'program':<20}{'b/chip':>7}{'HBM':>7}{'args':>7}{'temp':>7}{'total':>7}{'fits':>5}"
          f"{'TFLOP':>8}{'GF/img':>8}{'s@40%':>8}{'img/s@40%':>10}{'lower':>7}{'compile':>8}", flush=True)
    jobs = {t.name: AbstractJob(job_config(batch, args.dtype, args.job), t) for t in targets}
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    last_compile = 0.0
    for kind, branch in programs:  # programs outer: under a time limit every slice gets the first program first
        plan = parse_plan(branch, size, den)
        name = f"{kind.upper()} {plan}"
        for target in targets:
            elapsed = time.perf_counter() - start
            if results and elapsed + last_compile > args.time_limit:
                print(f"{target.name:<7}{name:<20}  skipped (time limit: {elapsed:.0f}s elapsed, "
                      f"last compile {last_compile:.0f}s)", flush=True)
                continue
            r = jobs[target.name].compile(kind, plan, batch)
            last_compile = r["lower_s"] + r["compile_s"]
            results[(target.name, kind, branch)] = r
            print_row(target, name, batch, r)
    for target in targets:
        g, d = results.get((target.name, "g", "plain")), results.get((target.name, "d", "plain"))
        if g and d and not math.isnan(g["flops"]) and not math.isnan(d["flops"]):
            flops = g["flops"] + d["flops"]
            t = step_seconds(flops, target, MFU)
            print(f"{target.name:<7}{'G+D micro-step plain':<20}{batch // target.chips:>7}{'':>42}"
                  f"{flops / 1e12:>8.1f}{flops / batch / 1e9:>8.0f}{t:>8.3f}{batch / t:>10.0f}", flush=True)
    print(f"compiles done in {time.perf_counter() - start:.0f}s")
    print(f"largest per-chip batch whose plain G step fits (search until {args.time_limit:.0f}s):")
    for target in targets:
        job = jobs[target.name]
        plan = parse_plan("plain", size, den)
        known = []
        r = results.get((target.name, "g", "plain"))
        if r is None:
            print(f"  {target.name}: no plain G compile to start from")
            continue
        gib = r.get("per_chip_gib")
        known.append((batch // job.target.chips, math.nan if gib is None else gib, bool(r["fits"])))
        lo, hi, est, n = search_batch(job, plan, known, deadline - last_compile, args.search_compiles)
        fits = f"{lo} (global {lo * job.target.chips})" if lo else "none found"
        fails = str(hi) if hi else "none found"
        guess = f"{est:.1f}" if est is not None else "-"
        print(f"  {job.target.name}: largest fitting per-chip batch {fits}, smallest failing {fails}, "
              f"linear estimate {guess} ({n} search compiles)", flush=True)


if __name__ == "__main__":
    main()
