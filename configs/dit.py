"""DiT / SiT on a latent cache: the EQ-VAE downstream recipe (DiT / fast-DiT; SiT's defaults for objective=sit).

    python -m eqvae_jax.main --config=configs/dit.py:model=XL/2 --workdir=gs://.../dit_xl2 \
        --config.latents.cache_dir=gs://.../latents/imagenet256

The recipe is the schema's defaults (eqvae_jax/train/dit/config.py `DiTJobConfig`, each value with its source):
AdamW lr 1e-4, no weight decay, betas (0.9, 0.999), constant, no clipping; global batch 256, 400K updates; EMA
0.9999 every update; 1000 classes, 10% label dropout, learned sigma, bf16 matmuls; a posterior sample of each
cached latent every step; 250 sampling steps without guidance. This file picks the size and objective and names
the gFID reference and Inception weights.

Variants (`:a=b,c`): model=S/2..XL/8 (default B/2, the paper's ablation workhorse), objective=ddpm (DiT: eps
prediction, MSE + VB, 250-step DDPM sampling) or sit (linear interpolant, velocity prediction, 250-step
Euler-Maruyama SDE), repa (with objective=sit: REPA's recipe, below), tiny (a 2-block 32-wide model on the
demo latent cache; CPU, seconds; make the cache first:
python -m eqvae_jax.main --config=configs/extract_latents.py:tiny --workdir=workdirs/latents_tiny).

gFID-10K monitoring (ADM's FID/sFID/IS/precision/recall of 10,000 EMA samples, logged as eval/fid, ...):
--config.sample.fid_every_updates=N (every N updates and at the end), with sample.fid_reference (ADM's
VIRTUAL_imagenet256_labeled.npz) and sample.inception (python -m eqvae_jax.convert --kind inception).

`objective=sit,repa` (configs/dit.py:model=XL/2,objective=sit,repa) is sihyun-yu/REPA's train.py: DINOv2-B/14
teacher on the cache's stored 256 px crops (extract with configs/extract_latents.py:images; convert the teacher with
python -m eqvae_jax.convert --kind dinov2 --src dinov2_vitb14_pretrain.pth --dst weights/dinov2_vitb14),
the tokens after block 8 through a 2048-wide projector, loss = velocity MSE + 0.5 * projection loss; SiT
without learned sigma (REPA's out_channels = in_channels), gradient clipping at global norm 1.0, AdamW 1e-4,
batch 256, EMA 0.9999, 400K updates, bf16 matmuls for the SiT and the teacher (REPA: fp16 autocast). XL/2 at
batch 256 needs --config.model.remat=True on v4-8, v5e-8 and v6e-8 (docs/repa.md has the TPU memory table).
Sampling (grids, gFID monitoring, python -m eqvae_jax.sample) follows REPA's README evaluation command: SDE
(Euler-Maruyama) 250 steps, cfg 1.8 applied only at noise levels tau <= 0.7 (REPA's time, 1 = noise;
`sample.guidance_low/high`); the EQ-VAE paper's no-CFG REPA row (400K: 7.9 -> 7.5) is --config.sample.cfg_scale=1.
"""

from eqvae_jax.models.dit import PATCHES, SIZES
from eqvae_jax.train.dit.config import defaults
from eqvae_jax.typed_config import parse_arg


def get_config(arg: str = ""):
    models = [f"{size}/{patch}" for size in SIZES for patch in PATCHES]
    a = parse_arg(arg, choices={"model": models, "objective": ("ddpm", "sit")}, model="B/2", objective="ddpm",
                  repa=False, tiny=False)
    size, patch = a.model.split("/")
    c = defaults()
    c.objective = a.objective
    c.model.size, c.model.patch = size, int(patch)
    c.sample.fid_reference = "VIRTUAL_imagenet256_labeled.npz"  # ADM's ImageNet 256 reference batch
    c.sample.inception = "weights/inception"  # python -m eqvae_jax.convert --kind inception
    if a.repa:
        apply_repa(c)
    if a.tiny:
        apply_tiny(c)
    return c


def apply_repa(c) -> None:
    """REPA (sihyun-yu/REPA@67f7145 train.py defaults) on top of the SiT recipe."""
    c.repa.enabled = True
    c.repa.teacher = "weights/dinov2_vitb14"  # --enc-type dinov2-vit-b (python -m eqvae_jax.convert --kind dinov2)
    c.model.learn_sigma = False  # REPA's SiT predicts the velocity only
    c.optim.grad_clip = 1.0  # --max-grad-norm
    c.sample.cfg_scale = 1.8  # REPA's README evaluation: generate.py --cfg-scale=1.8 --guidance-high=0.7 (mode sde)
    c.sample.guidance_high = 0.7


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
    if c.repa.enabled:  # a random 2-block 32-wide DINOv2 on the tiny cache's 64 px crops (56 px: 4x4 tokens)
        c.repa.teacher = "random"
        c.repa.teacher_preset = "vits14"
        c.repa.teacher_overrides = {"hidden_size": 32, "depth": 2, "num_heads": 2}
        c.repa.teacher_dtype = "float32"
        c.repa.z_dim = 32
        c.repa.projector_dim = 64
        c.repa.encoder_depth = 1
