"""MaskGIT train step on CPU: JAX (jitted) vs valeoai v1's MaskTransformer in PyTorch, same work per step.

    python -m benchmarks.maskgit_step [--preset base] [--depth N] [--batch 4] [--repeats 3] [--warmup 1]

One step is valeoai v1's training step on a batch of 16x16 token grids: arccos masking with a per-token
Bernoulli draw, 10% label drop, forward in train mode (dropout 0.1), cross-entropy with label smoothing 0.1
over all tokens, backward, gradient clipping at norm 1.0 and AdamW (lr 1e-4, betas (0.9, 0.96), weight decay
1e-5), fp32 in both frameworks. The PyTorch side is the v1 model transcribed in tests/torch_refs (the
reference's own code, module for module). Times are wall clock after warm-up (compilation for JAX),
median over the repeats. Prints a table; never used as a test.

`make_jax_step` and `abstract_inputs` give the step function and its argument shapes for ahead-of-time
compilation against a TPU topology (`jax.jit(step).lower(...)`); this script only runs on the local backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import median_seconds, step_table
from eqvae_jax.maskgit.loss import Objective, training_loss
from eqvae_jax.models import maskgit
from eqvae_jax.models.maskgit import MaskGITConfig, maskgit_flops

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.96), 1e-5, 1.0


def make_optimizer() -> optax.GradientTransformation:
    """valeoai v1's optimizer (no warm-up here: a benchmark runs at the full rate)."""
    return optax.chain(
        optax.clip_by_global_norm(CLIP), optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY)
    )


def make_jax_step(cfg: MaskGITConfig) -> tuple[Callable[..., Any], Any, optax.GradientTransformation]:
    """(step, params, optimizer) with step(params, opt_state, tokens, labels, key) -> (params, opt_state, loss)."""
    fn, params = maskgit.functional(maskgit.build(cfg))
    tx = make_optimizer()
    objective = Objective()

    def step(params, opt_state, tokens, labels, key):
        def loss_fn(p):
            model = lambda *a, **k: fn.apply(p, *a, **k)
            return training_loss(model, tokens, labels, key, cfg.mask_id, objective)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, tx


def abstract_inputs(cfg: MaskGITConfig, batch: int) -> tuple[Any, ...]:
    """Shapes of (tokens, labels, key) for one step."""
    g = cfg.grid_size
    return (
        jax.ShapeDtypeStruct((batch, g, g), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.eval_shape(lambda: jax.random.key(0)),
    )


def _batch(cfg: MaskGITConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    g = cfg.grid_size
    return rng.integers(0, cfg.codebook_size, (batch, g, g)), rng.integers(0, cfg.num_classes, batch)


def bench_jax(cfg: MaskGITConfig, batch: int, warmup: int, repeats: int) -> float:
    step, params, tx = make_jax_step(cfg)
    jstep = jax.jit(step, donate_argnums=(0, 1))
    tokens, labels = (jnp.asarray(a, jnp.int32) for a in _batch(cfg, batch))
    state = {"params": params, "opt": tx.init(params), "i": 0}

    def run() -> None:
        key = jax.random.fold_in(jax.random.key(0), state["i"])
        state["params"], state["opt"], loss = jstep(state["params"], state["opt"], tokens, labels, key)
        state["i"] += 1
        loss.block_until_ready()

    return median_seconds(run, repeats, max(warmup, 1))


def bench_torch(cfg: MaskGITConfig, batch: int, warmup: int, repeats: int) -> float:
    import torch  # test/benchmark dependency only
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "torch_refs"))
    from maskgit_reference import MaskTransformer, get_mask_code

    torch.manual_seed(0)
    model = MaskTransformer(hidden_dim=cfg.hidden_dim, codebook_size=cfg.codebook_size, f_factor=cfg.grid_size,
                            depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                            nclass=cfg.num_classes).train()
    opt = torch.optim.AdamW(model.parameters(), LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    code, y = (torch.from_numpy(a) for a in _batch(cfg, batch))

    def run() -> None:
        drop_label = torch.rand(batch) < 0.1
        masked_code, _ = get_mask_code(code, value=cfg.mask_id, codebook_size=cfg.codebook_size)
        pred = model(masked_code, y.clone(), drop_label=drop_label)
        loss = F.cross_entropy(pred.reshape(-1, cfg.num_logits), code.view(-1), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()

    return median_seconds(run, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=sorted(maskgit.PRESETS))
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    cfg = maskgit.PRESETS[args.preset]()
    if args.depth is not None:
        cfg = dataclasses.replace(cfg, depth=args.depth)
    flops = maskgit_flops(cfg, args.batch, train=True)
    rows = [("jax (jit)", bench_jax(cfg, args.batch, args.warmup, args.repeats))]
    if not args.skip_torch:
        rows.append(("torch (valeoai v1)", bench_torch(cfg, args.batch, args.warmup, args.repeats)))
    load = os.getloadavg()
    print(
        f"MaskGIT {args.preset} (depth {cfg.depth}, width {cfg.hidden_dim}) train step, batch {args.batch} x "
        f"{cfg.grid_size}x{cfg.grid_size} tokens, fp32, {jax.devices()[0].platform}; "
        f"{flops / 1e9:.0f} model GFLOP/step; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(step_table(rows, args.batch, flops, rate_digits=2))

if __name__ == "__main__":
    main()
