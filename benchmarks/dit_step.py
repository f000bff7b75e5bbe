"""DiT train step on CPU: JAX (jitted) vs diffusers' DiTTransformer2DModel in PyTorch, same work per step.

    python benchmarks/dit_step.py [--model B/2] [--batch 8] [--repeats 5] [--warmup 2]

One step = forward + backward + AdamW update (lr 1e-4, wd 0, as DiT) of a fp32 model on a batch of
32x32x4 latents with integer timesteps and class labels; the loss is the MSE of the full model output
(8 channels with learned sigma) against a fixed random target, the same in both frameworks. Times are wall
clock after warm-up (compilation for JAX), median over the repeats. Prints a table; never used as a test.

Ahead-of-time TPU compilation is a separate concern: `make_jax_step` returns the step function and
`abstract_inputs` its argument shapes (jax.ShapeDtypeStruct), which is what `jax.jit(...).lower(...)` needs
for an AOT compile against a TPU topology. This script only runs on the local backend.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import median_seconds, step_table
from eqvae_jax.models.dit import DiTConfig, build, dit_config, dit_flops

LR = 1e-4


def make_jax_step(cfg: DiTConfig) -> tuple[Callable[..., Any], Any, Any, optax.GradientTransformation]:
    """(step, params, rest, optimizer) with
    step(params, opt_state, rest, x, t, y, target) -> (params, opt_state, loss)."""
    model = build(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, weight_decay=0.0)

    def step(params, opt_state, rest, x, t, y, target):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(x, t, y)
            return jnp.mean(jnp.square(out - target))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, rest, tx


def abstract_inputs(cfg: DiTConfig, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of (x, t, y, target) for one step (NHWC latents, float timesteps, int labels)."""
    s, c = cfg.input_size, cfg.in_channels
    return (
        jax.ShapeDtypeStruct((batch, s, s, c), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, s, s, cfg.out_channels), jnp.float32),
    )


def _batch(cfg: DiTConfig, batch: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    s, c = cfg.input_size, cfg.in_channels
    return (
        rng.standard_normal((batch, s, s, c), dtype=np.float32),
        rng.integers(0, 1000, batch).astype(np.float32),
        rng.integers(0, cfg.num_classes, batch),
        rng.standard_normal((batch, s, s, cfg.out_channels), dtype=np.float32),
    )


def bench_jax(cfg: DiTConfig, batch: int, warmup: int, repeats: int) -> float:
    step, params, rest, tx = make_jax_step(cfg)
    jstep = jax.jit(step, donate_argnums=(0, 1))
    x, t, y, target = (jnp.asarray(a) for a in _batch(cfg, batch))
    state = {"params": params, "opt": tx.init(params)}

    def run() -> None:
        state["params"], state["opt"], loss = jstep(state["params"], state["opt"], rest, x, t, y, target)
        loss.block_until_ready()

    return median_seconds(run, repeats, max(warmup, 1))


def bench_torch(cfg: DiTConfig, batch: int, warmup: int, repeats: int) -> float:
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6,
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    x, t, y, target = _batch(cfg, batch)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    target = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous()
    t, y = torch.from_numpy(t).long(), torch.from_numpy(y)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x, timestep=t, class_labels=y).sample
        loss = torch.mean((out - target) ** 2)
        loss.backward()
        opt.step()

    return median_seconds(run, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="B/2", help="DiT size/patch, e.g. B/2, XL/2, S/8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    size, patch = args.model.split("/")
    cfg = dit_config(size, int(patch))
    flops = dit_flops(cfg, args.batch, train=True)
    rows = [("jax (jit)", bench_jax(cfg, args.batch, args.warmup, args.repeats))]
    if not args.skip_torch:
        rows.append(("torch (diffusers)", bench_torch(cfg, args.batch, args.warmup, args.repeats)))
    print(
        f"DiT-{args.model} train step, batch {args.batch} x 32x32x4, fp32, {jax.devices()[0].platform}; "
        f"{flops / 1e9:.0f} model GFLOP/step"
    )
    print(step_table(rows, args.batch, flops))

if __name__ == "__main__":
    main()
