"""DiT / SiT on a latent cache: the EQ-VAE downstream recipe (DiT / fast-DiT; SiT's defaults for objective=sit).

    python -m eqvae_jax.main --config=configs/dit.py:model=XL/2 --workdir=gs://.../dit_xl2 \
        --config.latents.cache_dir=gs://.../latents/imagenet256

Variants (`:a=b,c`): model=S/2..XL/8 (default B/2, the paper's ablation workhorse), objective=ddpm (DiT: eps
prediction, MSE + VB, 250-step DDPM sampling) or sit (linear interpolant, velocity prediction, 250-step
Euler-Maruyama SDE), tiny (a 2-block 32-wide model on the demo latent cache; CPU, seconds; make the cache
first: python -m eqvae_jax.main --config=configs/extract_latents.py:tiny --workdir=workdirs/latents_tiny).
"""

from eqvae_jax.train.dit.config import defaults
from eqvae_jax.typed_config import parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, model="B/2", objective="ddpm", tiny=False)
    size, patch = a.model.split("/")
    c = defaults()
    c.objective = a.objective
    c.model.size, c.model.patch = size, int(patch)
    c.model.num_classes = 1000
    c.model.class_dropout_prob = 0.1  # label dropout for classifier-free guidance
    c.model.learn_sigma = True
    c.model.compute_dtype = "bfloat16"  # the reference trains with fp16 autocast
    c.global_batch_size = 256
    c.total_updates = 400_000
    c.optim.lr, c.optim.weight_decay = 1e-4, 0.0  # AdamW, constant
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.grad_clip = 0.0
    c.ema_decay = 0.9999  # every update, initialised as a copy
    c.latents.sample_posterior = True  # z = mean + std * eps, times the VAE's scale (0.18215 for SD-VAE/EQ-VAE)
    c.sample.num_steps = 250
    c.sample.cfg_scale = 1.0  # the EQ-VAE README's evaluation: no guidance
    c.checkpoint.every_updates = 50_000
    c.log.every_updates = 100
    if a.tiny:
        apply_tiny(c)
    return c


def apply_tiny(c) -> None:
    """A 2-block 32-wide model on the tiny demo latent cache, a few updates at a toy learning rate."""
    c.model.size = "S"
    c.model.overrides = {"depth": 2, "hidden_size": 32, "num_heads": 2}
    c.model.num_classes = 10
    c.model.compute_dtype = "float32"
    c.latents.cache_dir = "workdirs/latents_tiny"
    c.global_batch_size = 8
    c.total_updates = 4
    c.optim.lr = 3e-3  # a toy set learns visibly within a few dozen updates
    c.ema_decay = 0.9
    c.fsdp_min_size = 256
    c.checkpoint.every_updates = 2
    c.checkpoint.async_save = False
    c.log.every_updates = 2
    c.sample.grid_count = 8
    c.sample.grid_steps = 4
    c.sample.num_steps = 8
