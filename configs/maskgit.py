"""MaskGIT on a token cache: valeoai/Maskgit-pytorch v1's recipe (commit 5ce6c9e), the one EQ-VAE follows.

    python -m eqvae_jax.main --config=configs/maskgit.py --workdir=gs://.../maskgit_base \
        --config.tokens.cache_dir=gs://.../tokens/imagenet256

Make the cache first (configs/extract_tokens.py with the (EQ-)VQGAN). The recipe is the schema's defaults
(eqvae_jax/train/maskgit/config.py `MaskGITJobConfig`, each value with its source): the base transformer with
dropout 0.1 and the class token appended, bf16 matmuls; arccos masking, label drop 0.1, label smoothing 0.1, loss on
all tokens; AdamW lr 1e-4, betas (0.9, 0.96), weight decay 1e-5, 2,500 warm-up updates, clipping at 1.0, no EMA;
8-step arccos sampling, softmax temperature 1, Gumbel temperature 4.5, CFG 3. This file sets the size, the batch and
the length from the variants. Global batch 512 follows v1's README (8 GPUs x 64; 755,200 iterations for its ~300
epochs); the EQ-VAE paper says "300 epochs with a batch size of 256", which v1's code cannot tell apart (--bsize is
per GPU): `batch=256` runs that reading (300 epochs = 1,501,200 updates), with the learning rate unchanged as the
paper gives none.

Variants (`:a=b,c`): batch=512|256, model=base|big|huge (v1's sizes), chang (Chang et al.'s MaskGIT options on the
same network: cosine masking schedule, loss on the masked tokens only, class token first), tiny (a 2-layer
64-wide model on the tiny demo token cache, a few updates; CPU, seconds; make the cache first:
python -m eqvae_jax.main --config=configs/extract_tokens.py:tiny --workdir=workdirs/tokens_tiny).
"""

from eqvae_jax.train.maskgit.config import defaults
from eqvae_jax.typed_config import parse_arg

IMAGENET_TRAIN = 1_281_167
EPOCHS = 300


def get_config(arg: str = ""):
    a = parse_arg(arg, batch=512, model="base", chang=False, tiny=False)
    c = defaults()
    c.model.preset = a.model  # base: 24 layers, width 768, 16 heads, MLP 3072 (the paper's)
    c.global_batch_size = a.batch
    c.total_updates = EPOCHS * (IMAGENET_TRAIN // a.batch)  # drop_last epochs: 750,600 at 512
    if a.chang:
        c.objective.schedule = "cosine"
        c.objective.loss_on = "masked"
        c.model.class_token_first = True
    if a.tiny:
        apply_tiny(c)
    return c


def apply_tiny(c) -> None:
    """A 2-layer 64-wide model on the tiny demo token cache (16x16 tokens of a 64-code book, 7 photographs)."""
    c.model.preset = "tiny"
    c.model.num_classes = 9  # the demo set's classes (one per photograph)
    c.model.compute_dtype = "float32"
    c.tokens.cache_dir = "workdirs/tokens_tiny"
    c.global_batch_size = 8
    c.total_updates = 4
    c.optim.lr = 1e-3  # a toy set learns visibly within a few hundred updates
    c.optim.warmup_updates = 10
    c.fsdp_min_size = 256
    c.checkpoint.every_updates = 2
    c.checkpoint.async_save = False
    c.log.every_updates = 2
    c.sample.grid_count = 8
