"""SiT on a latent cache: configs/dit.py with objective=sit (same variants: model=..., repa, tiny).

    python -m eqvae_jax.main --config=configs/sit.py:model=XL/2,repa --workdir=gs://.../sit_xl2_repa \
        --config.latents.cache_dir=gs://.../latents/imagenet256 --config.repa.teacher=weights/dinov2_vitb14

`repa` is REPA's recipe (see configs/dit.py); the cache must store its crops (configs/extract_latents.py:images).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("configs_dit", os.path.join(os.path.dirname(__file__), "dit.py"))
_dit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dit)


def get_config(arg: str = ""):
    return _dit.get_config(",".join(["objective=sit", *filter(None, [arg])]))
