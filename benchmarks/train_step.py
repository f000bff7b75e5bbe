"""EQ-VAE micro-step (one G step, then one D step on the same branch) on CPU: our jitted job vs PyTorch.

    python -m benchmarks.train_step [--size 256] [--batch 2] [--rounds 3] [--repeats 1] [--preset sd_vae|tiny]

Any --size that is a multiple of 32 from 64 works: the job is built with the one scale the benchmark draws
(24/32) instead of the reference's k/32 grid, which has whole latent sizes for every k only from 256 px.

JAX: the real steps of the job (`train.eqvae.job.build`) (configs/sdvae_ft.py with a random-init autoencoder and random
LPIPS VGG, image size and micro-batch from the flags, optim.accumulate=1 so every step applies Adam).
PyTorch, same architecture and loss: diffusers `AutoencoderKL` of the preset's shape, `lpips.LPIPS(net='vgg',
pnet_rand=True)` (train mode: dropout on, as the reference) with a random VGG16 (tests/torch_refs shim), taming's
`NLayerDiscriminator` (3 layers, ndf 64, `weights_init`), and the LDM `LPIPSWithDiscriminator` formulas of
tests/torch_refs/contperceptual_reference.py (L1 + LPIPS summed / B, KL 1e-6, adaptive weight from
`autograd.grad` w.r.t. the decoder's conv_out weight, disc weight 0.5, hinge D loss), Adam(0.5, 0.9) for both.
The D step redraws its autoencoder forward (d_step_transform='redraw'); PyTorch runs it under no_grad.

Branches: plain full resolution, and equivariance at scale 24/32 with one quarter turn. Times are wall clock
after warm-up (JAX compile excluded and reported separately as first call - steady step). The frameworks
alternate over --rounds rounds, swapping order each round, and the table gives the median and min-max over the
rounds and the median of the per-round ratios: a single back-to-back pair moved with the machine's load and
with whichever framework ran first (torch's OpenMP workers keep spinning for a while after its last op). The
header prints the thread settings (torch's threads, the OpenMP environment, XLA_FLAGS). All CPU cores (default)
or `--threads 1` on a loaded machine: on an oversubscribed CPU PyTorch's OpenMP barriers stall (steps vary
1-26 s). Prints a table; never used as a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import cpu_model, first_and_median, median_seconds

BRANCHES = ("plain", "eq24")  # full resolution; equivariance at scale 24/32 with one quarter turn


def draw(branch: str) -> Any:
    from eqvae_jax.losses import equivariance as eq

    if branch == "plain":
        return eq.Draw(eq.Branch.PLAIN, (32, 32), 32)
    return eq.Draw(eq.Branch.EQUIVARIANCE, (24, 24), 32, 1)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags train_step and step_breakdown share."""
    parser.add_argument("--preset", default="sd_vae", choices=("sd_vae", "tiny"))
    parser.add_argument("--size", type=int, default=256, help="image size; a multiple of 32 (see check_size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="0: each framework's default (all cores); 1: one thread in both (a loaded machine)")
    parser.add_argument("--branches", default="plain,eq24", help=f"comma list of {', '.join(BRANCHES)}")
    parser.add_argument("--xla-kernel-grad", action="store_true",
                        help="build the JAX models with XLA's own conv kernel gradient (models.conv_grad off): "
                             "the step before the CPU tap-matmul gradient")


def setup_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What must be set before JAX starts: --threads 1 as one XLA:CPU thread (XLA:CPU has no finer control), and
    the CPU allocator and dispatch settings the jobs use (`host_malloc`; both frameworks share the process;
    EQVAE_MALLOC=system: off)."""
    from eqvae_jax import host_malloc

    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    elif args.threads:
        parser.error("--threads must be 0 or 1")
    host_malloc.tune_for_cpu()


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The branches asked for; errors for unknown ones and for sizes the 24/32 branch cannot use.

    The job is built with the one scale it draws (24/32), not the reference's k/32 grid: at 128 px the f8
    latent is 16 and 16 * k/32 is integral only for even k, so the full grid is valid only from 256 px. 24/32
    of the latent is integral when the latent is a multiple of 4, i.e. the size a multiple of 4 * f = 32.
    """
    from eqvae_jax.models import kl_vae

    branches = args.branches.split(",")
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown:
        parser.error(f"unknown branch(es) {unknown}; choose from {', '.join(BRANCHES)}")
    step = 4 * kl_vae.PRESETS[args.preset]().downsample_factor
    if args.size % step or args.size < 64:
        parser.error(f"--size {args.size}: use a multiple of {step} from 64 (24/32 of the latent must be whole "
                     "and the discriminator needs a 48 px target)")
    return branches


def jax_job(args: argparse.Namespace) -> Any:
    """The real EQ-VAE job (configs/sdvae_ft.py, random init) at the benchmark's size and batch."""
    import jax

    from configs import sdvae_ft
    from eqvae_jax.models import conv_grad

    if getattr(args, "xla_kernel_grad", False):  # the models read it when they are built
        conv_grad.conv_general_dilated = jax.lax.conv_general_dilated
    from eqvae_jax.train.eqvae.config import parse_config
    from eqvae_jax.train.eqvae.job import build

    config = sdvae_ft.get_config()
    config.model.init, config.model.preset = "random", args.preset
    config.lpips.weights = "random"
    config.data.image_size, config.global_batch_size = args.size, args.batch
    config.transform.scale_numerators, config.transform.scale_denominator = [24], 32  # what `draw` uses
    config.optim.accumulate = 1
    return build(parse_config(config))


def benchmark_images(args: argparse.Namespace) -> Any:
    import jax

    return jax.device_put(np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3))
                          .astype(np.float32))


def jax_micro_steps(job: Any, images: Any, branch: str, seed: int = 0) -> tuple[Callable[[], None],
                                                                                Callable[[], None]]:
    """(G step, D step) of the job on `branch`, each blocking; D scores what the last G call produced."""
    import jax

    plan, rot = draw(branch).plan((images.shape[1], images.shape[2]))
    box: dict[str, Any] = {"key": jax.random.key(seed), "pair": None}

    def generator() -> None:
        box["key"], kg = jax.random.split(box["key"])
        job.state, metrics, box["pair"] = job.steps.generator(job.state, job.lpips_state, images, rot, kg, plan)
        jax.block_until_ready((job.state, metrics))

    def discriminator() -> None:
        box["key"], kd = jax.random.split(box["key"])
        job.state, metrics = job.steps.discriminator(job.state, images, rot, kd, box["pair"], plan)
        jax.block_until_ready((job.state, metrics))

    return generator, discriminator


def jax_runner(args: argparse.Namespace) -> tuple[Callable[[str], Callable[[], None]], Any]:
    """(branch -> one G+D micro-step of the real job, blocking; the job)."""
    job = jax_job(args)
    images = benchmark_images(args)

    def make(branch: str) -> Callable[[], None]:
        generator, discriminator = jax_micro_steps(job, images, branch)
        return lambda: (generator(), discriminator())

    return make, job


@dataclasses.dataclass
class TorchModels:
    """The PyTorch reference: autoencoder, LPIPS, PatchGAN, the LDM loss, both Adams and one input batch."""

    vae: Any
    perceptual: Any
    disc: Any
    loss: Any
    opt_g: Any
    opt_d: Any
    x: Any
    latent_shape: tuple[int, ...]

    def encode(self, t: Any) -> Any:
        return self.vae.quant_conv(self.vae.encoder(t))

    def decode(self, z: Any) -> Any:
        return self.vae.decoder(self.vae.post_quant_conv(z))


def torch_models(args: argparse.Namespace, vae_cfg: Any) -> TorchModels:
    """The PyTorch models of the same architecture and loss, seeded."""
    import torch
    from diffusers import AutoencoderKL

    from tests.torch_refs import contperceptual_reference as ref
    from tests.torch_refs import torchvision_shim

    torchvision_shim.install()
    import lpips
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    levels = len(vae_cfg.channel_mult)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(vae_cfg.base_channels * m for m in vae_cfg.channel_mult),
        layers_per_block=vae_cfg.num_res_blocks, latent_channels=vae_cfg.latent_channels,
        norm_num_groups=vae_cfg.norm_num_groups, sample_size=args.size,
        mid_block_add_attention=vae_cfg.mid_attention,
    )
    perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    for p in perceptual.parameters():
        p.requires_grad_(False)
    disc = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3).apply(weights_init)
    loss = ref.LPIPSWithDiscriminator(perceptual, disc, disc_start=0, kl_weight=1e-6, disc_weight=0.5)
    vae.train()
    loss.train()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, args.size, args.size))
                         .astype(np.float32))
    f = vae_cfg.downsample_factor
    return TorchModels(vae, perceptual, disc, loss,
                       torch.optim.Adam(vae.parameters(), lr=7.2e-4, betas=(0.5, 0.9)),
                       torch.optim.Adam(disc.parameters(), lr=7.2e-4, betas=(0.5, 0.9)), x,
                       (args.batch, vae_cfg.latent_channels, args.size // f, args.size // f))


def torch_micro_steps(m: TorchModels, branch: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(G step, D step) of the PyTorch reference on `branch`; D redraws its forward under no_grad."""
    import torch

    from tests.torch_refs import contperceptual_reference as ref

    d = draw(branch)
    kind = d.branch.value
    scale, angle = d.scale[0] / d.denominator, d.rot_k

    def generator() -> None:
        target, recon, post = ref.transformed_forward(m.encode, m.decode, m.x, torch.randn(m.latent_shape), kind,
                                                      scale, angle)
        g_loss, _ = m.loss(target, recon, post, 0, 1, last_layer=m.vae.decoder.conv_out.weight)
        m.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        m.opt_g.step()

    def discriminator() -> None:
        with torch.no_grad():
            target, recon, post = ref.transformed_forward(m.encode, m.decode, m.x, torch.randn(m.latent_shape),
                                                          kind, scale, angle)
        d_loss, _ = m.loss(target, recon, post, 1, 1)
        m.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        m.opt_d.step()

    return generator, discriminator


def torch_runner(args: argparse.Namespace, vae_cfg: Any) -> Callable[[str], Callable[[], None]]:
    """(branch -> one PyTorch G+D micro-step of the same architecture and loss)."""
    models = torch_models(args, vae_cfg)

    def make(branch: str) -> Callable[[], None]:
        generator, discriminator = torch_micro_steps(models, branch)
        return lambda: (generator(), discriminator())

    return make


def thread_settings() -> str:
    """What decides each framework's threads, and the malloc setting (printed with every table: the numbers depend
    on them)."""
    import torch

    from eqvae_jax import host_malloc

    omp = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME") if k in os.environ}
    return (f"torch {torch.get_num_threads()} intra-op threads (OpenMP env {omp or 'unset'}), XLA_FLAGS="
            f"{os.environ.get('XLA_FLAGS', '')!r}, {os.cpu_count()} CPUs ({cpu_model()}); {host_malloc.outcome()}")


def timed_rounds(runners: dict[str, Callable[[str], Callable[[], None]]], branches: list[str], rounds: int,
                 repeats: int) -> dict[tuple[str, str], list[float]]:
    """{(framework, branch): the median of `repeats` micro-steps in each round}. The frameworks alternate and
    swap order every round (jax first, then torch first, ...), so neither always runs right after the other's
    threads (torch's OpenMP workers spin for a while after each op) or always on a cooler/warmer machine."""
    steps = {(f, b): make(b) for f, make in runners.items() for b in branches}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    order = list(runners)
    for r in range(rounds):
        for f in order if r % 2 == 0 else order[::-1]:
            for b in branches:
                times[f, b].append(median_seconds(steps[f, b], repeats))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{f} {b} {t[-1]:.2f}s" for (f, b), t in times.items()),
              flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (frameworks swap order each)")
    parser.add_argument("--repeats", type=int, default=1, help="timed micro-steps per framework and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    args = parser.parse_args()
    setup_threads(parser, args)
    branches = check_args(parser, args)
    import jax
    import torch

    from eqvae_jax.models import kl_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    vae_cfg = kl_vae.PRESETS[args.preset]()
    print(f"EQ-VAE micro-step (G then D), {args.preset} fp32, {args.size}px, batch {args.batch}, {args.rounds} "
          f"alternating rounds x {args.repeats}; jax {jax.__version__} ({jax.default_backend()}), torch "
          f"{torch.__version__}; {thread_settings()}; conv kernel gradient "
          f"{'XLA' if args.xla_kernel_grad else 'tap matmuls (CPU)'}; load {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    make_jax, _ = jax_runner(args)
    make_torch = torch_runner(args, vae_cfg)
    print(f"jax job and torch models built in {time.perf_counter() - start:.1f}s", flush=True)
    compile_s = {}
    for b in branches:  # first call (jax: compile) and warm-up, outside the rounds
        first, steady = first_and_median(make_jax(b), args.warmup, 1)
        compile_s[b] = first - steady
        first_and_median(make_torch(b), args.warmup, 1)
    times = timed_rounds({"jax": make_jax, "torch": make_torch}, branches, args.rounds, args.repeats)
    print(f"{'branch':<22}{'jax s/step':>12}{'(min-max)':>14}{'torch s/step':>14}{'(min-max)':>14}"
          f"{'jax/torch':>11}{'(min-max)':>13}{'jax compile s':>15}")
    for b in branches:
        plan, _ = draw(b).plan((args.size, args.size))
        j, t = times["jax", b], times["torch", b]
        ratios = [x / y for x, y in zip(j, t, strict=True)]  # per round: the two ran back to back
        print(f"{str(plan):<22}{statistics.median(j):>12.2f}{f'{min(j):.2f}-{max(j):.2f}':>14}"
              f"{statistics.median(t):>14.2f}{f'{min(t):.2f}-{max(t):.2f}':>14}{statistics.median(ratios):>11.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>13}{compile_s[b]:>15.1f}")
    print(f"medians over {args.rounds} rounds; jax/torch is the median of the per-round ratios. "
          f"Load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
