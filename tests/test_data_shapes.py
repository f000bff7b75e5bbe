"""The procedural `shapes` dataset: deterministic per (seed, split, index), balanced, every class drawable at
32 and 256 px and told apart from the others, and a source that the production pipeline reads."""

import io

import numpy as np
import pytest
from absl import flags
from PIL import Image

from eqvae_jax.data import shapes
from eqvae_jax.data.config import DataConfig
from eqvae_jax.data.iterator import build_train_iterator
from eqvae_jax.data.sources import open_source
from eqvae_jax.parallel.mesh import make_mesh

flags.FLAGS.mark_as_parsed()


def test_rendering_is_deterministic_per_seed_split_and_index():
    a, label = shapes.render(3, "train", 17, 32)
    b, _ = shapes.render(3, "train", 17, 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and label == 17 % len(shapes.CLASSES)
    np.testing.assert_array_equal(a, b)
    for other in (shapes.render(4, "train", 17, 32)[0], shapes.render(3, "validation", 17, 32)[0],
                  shapes.render(3, "train", 25, 32)[0]):  # 25: same class, another draw
        assert np.abs(other.astype(int) - a).mean() > 5


def test_classes_are_balanced_in_every_prefix():
    source = shapes.ShapesSource("train", 16, 1 << 24)
    labels = [source[i]["label"] for i in range(8 * 12)]
    assert np.bincount(labels).tolist() == [12] * len(shapes.CLASSES)
    held_out = shapes.ShapesSource("validation", 16, 80)
    assert np.bincount([held_out[i]["label"] for i in range(80)]).tolist() == [10] * len(shapes.CLASSES)


def test_figure_masks_differ_pairwise():
    """In their own frame, any two classes disagree on a sizeable part of the plane (they are different
    figures, not near-duplicates)."""
    u = np.linspace(-1.2, 1.2, 241)
    x, y = np.meshgrid(u, u)
    masks = {name: shapes.figure_mask(name, x, y) for name in shapes.CLASSES}
    for i, a in enumerate(shapes.CLASSES):
        assert 0.05 < masks[a].mean() < 0.7, a
        for b in shapes.CLASSES[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.03, (a, b)
    with pytest.raises(ValueError, match="unknown figure"):
        shapes.figure_mask("pentagon", x, y)


@pytest.mark.parametrize("size", [32, 256])
def test_every_class_is_drawn_and_visible(size):
    for index in range(len(shapes.CLASSES)):
        image, label = shapes.render(0, "train", index, size)
        assert label == index and image.shape == (size, size, 3)
        # The figure is a flat colour: its pixels dominate the image's most common colour.
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        share = counts.max() / (size * size)
        assert 0.01 < share < 0.6, (shapes.CLASSES[index], size, share)
        assert image.std() > 10


def test_source_records_are_png_of_the_rendered_image():
    source = shapes.ShapesSource("validation", 24, 10, seed=5)
    record = source[3]
    decoded = np.asarray(Image.open(io.BytesIO(record["bytes"])))
    np.testing.assert_array_equal(decoded, shapes.render(5, "validation", 3, 24)[0])
    assert record["label"] == 3 and not record["unreadable"]
    with pytest.raises(IndexError):
        source[10]
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesSource("test", 24, 10)


def test_data_config_opens_shapes_and_the_pipeline_batches_it():
    config = DataConfig(source="shapes", image_size=32, transform="resize_center_crop", worker_count=0,
                        shapes_eval_size=16)
    assert repr(open_source(config, train=False)) == "ShapesSource('validation', 32 px, 16 records, seed 0)"
    problems = DataConfig(source="shapes", shapes_train_size=0).problems()
    assert problems == ["data.shapes_train_size must be positive, got 0"]
    iterator = build_train_iterator(config, make_mesh(-1, 1), 8)
    try:
        batch = next(iterator)
        assert batch["image"].shape == (8, 32, 32, 3)
        assert float(batch["image"].min()) >= -1 and float(batch["image"].max()) <= 1
        assert len(set(np.asarray(batch["label"]).tolist())) > 1
    finally:
        iterator.close()
