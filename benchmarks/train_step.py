"""EQ-VAE micro-step (one G step, then one D step on the same branch) on CPU: our jitted job vs PyTorch.

    python -m benchmarks.train_step [--size 256] [--batch 2] [--repeats 3] [--preset sd_vae|tiny]

JAX: the real steps of the job (`train.eqvae.job.build`) (configs/sdvae_ft.py with a random-init autoencoder and random
LPIPS VGG, image size and micro-batch from the flags, optim.accumulate=1 so every step applies Adam).
PyTorch, same architecture and loss: diffusers `AutoencoderKL` of the preset's shape, `lpips.LPIPS(net='vgg',
pnet_rand=True)` (train mode: dropout on, as the reference) with a random VGG16 (tests/torch_refs shim), taming's
`NLayerDiscriminator` (3 layers, ndf 64, `weights_init`), and the LDM `LPIPSWithDiscriminator` formulas of
tests/torch_refs/contperceptual_reference.py (L1 + LPIPS summed / B, KL 1e-6, adaptive weight from
`autograd.grad` w.r.t. the decoder's conv_out weight, disc weight 0.5, hinge D loss), Adam(0.5, 0.9) for both.
The D step redraws its autoencoder forward (d_step_transform='redraw'); PyTorch runs it under no_grad.

Branches: plain full resolution, and equivariance at scale 24/32 with one quarter turn. Times are wall clock
after warm-up (JAX compile excluded and reported separately as first call - median), median of --repeats.
Both frameworks run one after the other, with all CPU cores (default) or `--threads 1` on a loaded machine: on
an oversubscribed CPU PyTorch's OpenMP barriers stall (steps vary 1-26 s); one thread each is the fair setting
there. Prints a table; never used as a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

BRANCHES = ("plain", "eq24")  # full resolution; equivariance at scale 24/32 with one quarter turn


def draw(branch: str) -> Any:
    from eqvae_jax.losses import equivariance as eq

    if branch == "plain":
        return eq.Draw(eq.Branch.PLAIN, (32, 32), 32)
    return eq.Draw(eq.Branch.EQUIVARIANCE, (24, 24), 32, 1)


def timed(fn: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` calls after `warmup` more)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def jax_runner(args: argparse.Namespace) -> tuple[Callable[[str], Callable[[], None]], Any]:
    """(branch -> one G+D micro-step of the real job, blocking; the job)."""
    import jax

    from configs import sdvae_ft
    from eqvae_jax.train.eqvae.config import parse_config
    from eqvae_jax.train.eqvae.job import build

    config = sdvae_ft.get_config()
    config.model.init, config.model.preset = "random", args.preset
    config.lpips.weights = "random"
    config.data.image_size, config.global_batch_size = args.size, args.batch
    config.optim.accumulate = 1
    job = build(parse_config(config))
    images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3))
                            .astype(np.float32))
    key = jax.random.key(0)

    def make(branch: str) -> Callable[[], None]:
        plan, rot = draw(branch).plan((args.size, args.size))

        def step() -> None:
            nonlocal key
            key, kg, kd = jax.random.split(key, 3)
            job.state, _, pair = job.steps.generator(job.state, job.lpips_state, images, rot, kg, plan)
            job.state, metrics = job.steps.discriminator(job.state, images, rot, kd, pair, plan)
            jax.block_until_ready((job.state, metrics))

        return step

    return make, job


def torch_runner(args: argparse.Namespace, vae_cfg: Any) -> Callable[[str], Callable[[], None]]:
    """(branch -> one PyTorch G+D micro-step of the same architecture and loss)."""
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
    opt_g = torch.optim.Adam(vae.parameters(), lr=7.2e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=7.2e-4, betas=(0.5, 0.9))
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, args.size, args.size))
                         .astype(np.float32))
    f = vae_cfg.downsample_factor
    latent = (args.batch, vae_cfg.latent_channels, args.size // f, args.size // f)

    def encode(t: torch.Tensor) -> torch.Tensor:
        return vae.quant_conv(vae.encoder(t))

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decoder(vae.post_quant_conv(z))

    def make(branch: str) -> Callable[[], None]:
        d = draw(branch)
        kind = d.branch.value
        scale, angle = d.scale[0] / d.denominator, d.rot_k

        def step() -> None:
            target, recon, post = ref.transformed_forward(encode, decode, x, torch.randn(latent), kind, scale, angle)
            g_loss, _ = loss(target, recon, post, 0, 1, last_layer=vae.decoder.conv_out.weight)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            with torch.no_grad():
                target, recon, post = ref.transformed_forward(encode, decode, x, torch.randn(latent), kind, scale,
                                                              angle)
            d_loss, _ = loss(target, recon, post, 1, 1)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        return step

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd_vae", choices=("sd_vae", "tiny"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument("--threads", type=int, default=0,
                        help="0: each framework's default (all cores); 1: one thread in both (a loaded machine)")
    parser.add_argument("--branches", default="plain,eq24", help=f"comma list of {', '.join(BRANCHES)}")
    args = parser.parse_args()
    if args.threads == 1:  # before jax is imported; XLA:CPU has no finer thread-count control
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    elif args.threads:
        parser.error("--threads must be 0 or 1")
    import jax
    import torch

    from eqvae_jax.models import kl_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    branches = args.branches.split(",")
    vae_cfg = kl_vae.PRESETS[args.preset]()
    print(f"EQ-VAE micro-step (G then D), {args.preset} fp32, {args.size}px, batch {args.batch}, "
          f"{args.repeats} repeats; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    make_jax, _ = jax_runner(args)
    print(f"jax job built in {time.perf_counter() - start:.1f}s", flush=True)
    jax_times = {b: timed(make_jax(b), args.warmup, args.repeats) for b in branches}
    start = time.perf_counter()
    make_torch = torch_runner(args, vae_cfg)
    print(f"torch models built in {time.perf_counter() - start:.1f}s", flush=True)
    torch_times = {b: timed(make_torch(b), args.warmup, args.repeats) for b in branches}
    print(f"{'branch':<22}{'jax s/step':>12}{'torch s/step':>14}{'torch/jax':>11}{'jax compile s':>15}")
    for b in branches:
        plan, _ = draw(b).plan((args.size, args.size))
        (j_first, j), (_, t) = jax_times[b], torch_times[b]
        print(f"{str(plan):<22}{j:>12.3f}{t:>14.3f}{t / j:>11.2f}{j_first - j:>15.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
