"""eqvae-jax: EQ-VAE (equivariance-regularized autoencoder latents) and latent generative models in JAX."""

import os as _os

__version__ = "0.1.0"

# gs:// through gcsfs rather than TensorFlow's GCS filesystem (eqvae_jax/storage.py says why); set before etils
# resolves (and caches) its first gs:// backend, which any module of the package may do.
_os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs's experimental file system (the default from gcsfs 2026.x) asks the Storage Control gRPC API for each
# bucket's type before its first use: a call no Cloud Storage emulator answers (a 60 s timeout per bucket,
# then a fallback to the plain JSON-API file system). The plain one is what every write here needs.
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
