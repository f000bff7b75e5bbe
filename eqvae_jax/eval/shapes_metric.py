"""Sample quality on `shapes` without any download: a classifier trained here, fed to the ADM metric code.

    model, report = train_classifier(ClassifierTraining(size=32, seed=0))   # report: held-out accuracy, time
    shapes_classifier.save(model, "weights/clf"); model = shapes_classifier.load("weights/clf")
    ref = reference_images(size=32, count=2000)                             # held-out split, uint8
    scores = sample_metrics(model, ref, samples, sample_labels)             # fid, sfid, IS, P/R, class acc.

The classifier (`models/shapes_classifier.py`) replaces Inception: its penultimate features give FID and
precision/recall, a slice of an intermediate map sFID, its softmax the Inception Score (at most 8 here), and
its argmax the class accuracy of class-conditional samples. All numbers compare runs within this domain only.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eqvae_jax.data import shapes
from eqvae_jax.eval import adm_metrics
from eqvae_jax.models import shapes_classifier
from eqvae_jax.models.shapes_classifier import ShapesClassifier, ShapesClassifierConfig


@dataclasses.dataclass(frozen=True)
class ClassifierTraining:
    size: int = 32  # image resolution (the classifier's input size)
    seed: int = 0  # initialisation, data order, and the shapes seed of the training images
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    train_images: int = 16384  # rendered once from the train split
    eval_images: int = 2000  # held-out split, for the reported accuracy
    channels: tuple[int, ...] = (32, 64, 128)


def render_set(seed: int, split: str, count: int, size: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (count, size, size, 3) images, int32 labels) of records start..start+count of a split."""
    pairs = [shapes.render(seed, split, i, size) for i in range(start, start + count)]
    return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.int32)


def reference_images(size: int, count: int, seed: int = 0) -> np.ndarray:
    """The held-out images that samples are compared against (the 'reference batch')."""
    return render_set(seed, "validation", count, size)[0]


def _train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    def loss_fn(params: nnx.State, images: jax.Array, labels: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        logits = model(model.preprocess(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params: nnx.State, opt_state: optax.OptState, images: jax.Array, labels: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def predict(model: ShapesClassifier, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Class logits (N, classes) of uint8 images, in batches."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x)["logits_unbiased"])
    return np.concatenate([np.asarray(fn(state, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def train_classifier(t: ClassifierTraining) -> tuple[ShapesClassifier, dict[str, float]]:
    """Fit the classifier on rendered train images; report its held-out accuracy and the time it took."""
    start = time.perf_counter()
    config = ShapesClassifierConfig(image_size=t.size, channels=tuple(t.channels), num_classes=len(shapes.CLASSES))
    model = shapes_classifier.build(config, seed=t.seed)
    images, labels = render_set(t.seed, "train", t.train_images, t.size)
    tx = optax.adam(t.learning_rate)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    step = _train_step(graphdef, tx)
    order = np.random.default_rng(t.seed)
    loss = jnp.zeros(())
    for _ in range(t.steps):
        idx = order.integers(0, len(images), t.batch_size)
        params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
    model = nnx.merge(graphdef, params)
    held_out, held_labels = render_set(t.seed, "validation", t.eval_images, t.size)
    accuracy = float((predict(model, held_out).argmax(-1) == held_labels).mean())
    return model, {"held_out_accuracy": accuracy, "final_loss": float(loss), "steps": t.steps,
                   "seconds": time.perf_counter() - start}


def features(model: ShapesClassifier, images: np.ndarray, batch_size: int = 500) -> adm_metrics.Activations:
    """The ADM metric inputs (pool, spatial, logits) of uint8 images."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
    parts = [jax.device_get(fn(state, images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return adm_metrics.Activations(**{k: np.concatenate([np.asarray(p[k]) for p in parts])
                                      for k in ("pool", "spatial", "logits_unbiased")})


def sample_metrics(model: ShapesClassifier, reference: np.ndarray, samples: np.ndarray,
                   labels: np.ndarray | None = None) -> dict[str, float]:
    """ADM's metrics of `samples` against `reference` in the classifier's features, plus the class accuracy
    of class-conditional samples (their intended `labels`) when given."""
    sample_acts = features(model, samples)
    out = adm_metrics.evaluate(features(model, reference), sample_acts)
    if labels is not None:
        out["class_accuracy"] = float((sample_acts.logits_unbiased.argmax(-1) == np.asarray(labels)).mean())
    return out

