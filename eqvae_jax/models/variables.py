"""Variable types shared by the models."""

from flax import nnx


class Frozen(nnx.Variable):
    """Weights that are loaded, never trained: LPIPS/VGG, Inception, fixed position embeddings.

    Optimizers are built over `nnx.Param` only, so nothing of this type is ever updated or weight-decayed.
    """
