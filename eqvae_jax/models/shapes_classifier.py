"""A small CNN classifier of the `shapes` dataset: the feature network of the download-free sample metrics.

Three stages of two 3x3 conv + GroupNorm + ReLU layers, each followed by 2x max pooling, then a global average pool
(the penultimate features) and a linear head (the class logits). `features(uint8 images)` returns the three
arrays the ADM metric code reads from Inception, so `eval.features.InceptionExtractor` and
`eval.generation.GenerationEvaluator` take it unchanged:

  pool             (B, channels[-1])       penultimate features: FID, precision/recall
  spatial          (B, S*S*SPATIAL)        the first SPATIAL channels of the second stage's map: sFID
  logits_unbiased  (B, num_classes)        class logits: IS (at most num_classes) and class accuracy

The numbers compare runs within the `shapes` domain only; they are not ImageNet FIDs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.host_init import init_on_host

KIND = "shapes_classifier"
SPATIAL = 4
GROUPS = 8  # GroupNorm after every conv: without it the 6-layer ReLU stack barely trains


@dataclasses.dataclass(frozen=True)
class ShapesClassifierConfig:
    image_size: int = 32  # inputs are resized (bilinear, antialiased) to this size
    channels: tuple[int, ...] = (32, 64, 128)
    num_classes: int = 8


class ShapesClassifier(nnx.Module):
    def __init__(self, config: ShapesClassifierConfig, *, rngs: nnx.Rngs):
        if len(config.channels) < 2:
            raise ValueError(f"the classifier needs at least 2 stages, got channels={config.channels}")
        self.config = config
        convs, norms, cin = [], [], 3
        for c in config.channels:
            convs += [nnx.Conv(cin, c, (3, 3), rngs=rngs), nnx.Conv(c, c, (3, 3), rngs=rngs)]
            norms += [nnx.GroupNorm(c, num_groups=min(GROUPS, c), rngs=rngs) for _ in range(2)]
            cin = c
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.head = nnx.Linear(cin, config.num_classes, rngs=rngs)

    def embed(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(second stage's map, penultimate features) of float images in [-1, 1] at `image_size`."""
        maps = []
        for stage in range(len(self.config.channels)):
            for i in (2 * stage, 2 * stage + 1):
                x = jax.nn.relu(self.norms[i](self.convs[i](x)))
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            maps.append(x)
        return maps[1], jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Class logits of float images in [-1, 1] at `image_size`."""
        return self.head(self.embed(x)[1])

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 (or 0..255 float) NHWC images of any size -> float in [-1, 1] at `image_size`."""
        x = images.astype(jnp.float32) / 127.5 - 1.0
        size = self.config.image_size
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), method="linear", antialias=True)
        return x

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        """The ADM metric inputs of uint8 images (module docstring)."""
        spatial, pool = self.embed(self.preprocess(images))
        return {"pool": pool, "spatial": spatial[..., :SPATIAL].reshape(images.shape[0], -1),
                "logits_unbiased": self.head(pool)}


def _init(config: ShapesClassifierConfig, seed: int) -> ShapesClassifier:
    """PyTorch-default distributions, drawn with numpy on the host (no compile per weight shape)."""
    return init_on_host(abstract(config), seed)


# build(config=None, *, seed=0), abstract(config=None), load(path, **overrides), save(model, path): see
# `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, ShapesClassifierConfig, lambda config, rngs: ShapesClassifier(config, rngs=rngs), init=_init)
