"""The paper's reconstruction evaluation (Tables 1 and 12): rFID, PSNR, SSIM, LPIPS, equivariance error, TwoNN.

    python -m eqvae_jax.eval_vae --config=configs/eval_vae.py:models=sd_vae+eq_vae --workdir=gs://B/eval/sd_vs_eq
    python -m eqvae_jax.eval_vae --config=configs/eval_vae.py:models=vqgan+eq_vqgan --workdir=gs://B/eval/vq
    python -m eqvae_jax.eval_vae --config=configs/eval_vae.py:tiny --workdir=workdirs/eval_vae_tiny   # CPU demo

The protocol is the schema's defaults (eqvae_jax/train/eval_vae/config.py `EvalVAEConfig`), zelaki/eqvae's eval.py: the
50,000 ImageNet validation images (TFDS imagenet2012 'validation', prepared with `python -m
eqvae_jax.data.imagenet`; or `--config.data.source=folder --config.data.eval_folder=DIR`), torchvision Resize(256) +
CenterCrop(256), a posterior sample decoded, rFID 50K vs 50K with the FID Inception (fed as ADM's evaluator does;
--config.fid_preprocess=pytorch_fid feeds it as the reference's pytorch-fid), PSNR, SSIM, VGG LPIPS; plus the
paper's equivariance error (rotations 90/180/270, scales 0.25/0.5/0.75) and the TwoNN intrinsic dimension of 10,000
latents.

Variants (`:a,b=c`):
  models=A+B+...   the autoencoders, compared side by side (default sd_vae+eq_vae). Known names and their weights
                   dirs are MODELS below; any other name is a KL model at weights/<name>. Override per model with
                   --config.models.NAME.weights=DIR (and .kind=vq_vae for a VQ model).
  tiny             seconds on a CPU: a tiny random KL and VQ model on the nine embedded demo photos at 32 px, a
                   tiny random Inception and LPIPS (their numbers mean nothing; it exercises the whole path).

Weights: python -m eqvae_jax.convert --kind kl_vae | vq_vae | inception | lpips (README, "Converting weights").
"""

from eqvae_jax.data.demo import IMAGES_DIR
from eqvae_jax.train.eval_vae.config import defaults, model_section
from eqvae_jax.typed_config import parse_arg

# name: (kind, weights dir)
MODELS = {
    "sd_vae": ("kl_vae", "weights/sd_vae"),  # SD-VAE (LDM kl-f8 / sd-vae-ft-*): the paper's baseline
    "eq_vae": ("kl_vae", "weights/eq_vae"),  # zelaki/eq-vae: 5 epochs of EQ-VAE fine-tuning on OpenImages
    "eq_vae_ema": ("kl_vae", "weights/eq_vae_ema"),  # zelaki/eq-vae-ema: 44 ImageNet epochs, EMA weights
    "sdxl_vae": ("kl_vae", "weights/sdxl_vae"),
    "sd3_vae": ("kl_vae", "weights/sd3_vae"),
    "vqgan": ("vq_vae", "weights/vqgan"),  # taming's ImageNet VQGAN f16 n1024 (MaskGIT's tokenizer)
    "eq_vqgan": ("vq_vae", "weights/eq_vqgan"),  # the same after EQ-VQGAN fine-tuning
}


def get_config(arg: str = ""):
    a = parse_arg(arg, models="sd_vae+eq_vae", tiny=False)
    c = defaults()
    if a.tiny:
        apply_tiny(c)
        return c
    c.models = {name: model_section(kind=MODELS.get(name, ("kl_vae",))[0],
                                    weights=MODELS.get(name, ("", f"weights/{name}"))[1])
                for name in a.models.split("+")}
    c.inception = "weights/inception"
    c.lpips = "weights/lpips"
    return c


def apply_tiny(c) -> None:
    """Tiny random KL (f2) and VQ (f2) models on the demo photos at 32 px; random tiny Inception and LPIPS."""
    kl = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "norm_num_groups": 4, "sample_size": 32}
    vq = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "norm_num_groups": 4, "resolution": 32,
          "z_channels": 4, "embed_dim": 4, "n_embed": 32}
    c.models = {"kl": model_section(init="random", kind="kl_vae", preset="tiny", overrides=kl, seed=0),
                "vq": model_section(init="random", kind="vq_vae", preset="tiny", overrides=vq, seed=0)}
    c.data.source = "folder"
    c.data.eval_folder = str(IMAGES_DIR)  # the nine embedded photographs
    c.data.label_from_parent = False
    c.data.image_size = 32
    c.data.worker_count = 0
    c.num_images = 0  # all nine
    c.global_batch_size = 8
    c.shard_size = 8  # two shards: resumable in miniature
    c.inception = "random"
    c.lpips = "random"
    c.id_images = 9
    c.preview_images = 4
