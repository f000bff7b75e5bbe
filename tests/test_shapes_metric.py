"""The download-free sample metric on `shapes`: a classifier that learns the classes, whose features give
FID ~ 0 for identical image sets and a larger FID for a shifted set, and a weights directory that round-trips."""

import numpy as np
import pytest
from helpers import xla_optimized

from eqvae_jax.eval import shapes_metric
from eqvae_jax.eval.adm_metrics import EvaluationWarning
from eqvae_jax.models import shapes_classifier
from eqvae_jax.models.weights import flat_variables


@pytest.fixture(scope="module")
def classifier():
    """Trained with XLA's optimizations on: 300 calls of one small program are where they pay for their compile
    time (the suite otherwise compiles at -O0, conftest.py; measured quiet: 46 -> 35 s)."""
    training = shapes_metric.ClassifierTraining(size=32, steps=300, batch_size=64, train_images=2048,
                                                eval_images=400, channels=(16, 32, 64))
    with xla_optimized():
        return shapes_metric.train_classifier(training)


def test_classifier_learns_the_classes(classifier):
    _, report = classifier
    assert report["held_out_accuracy"] > 0.25, report  # chance is 1/8; the full recipe reaches far more


def test_identical_sets_give_fid_near_zero_and_a_shifted_set_more(classifier):
    model, _ = classifier
    reference = shapes_metric.reference_images(size=32, count=300)
    samples, labels = shapes_metric.render_set(0, "validation", 300, 32)
    with pytest.warns(EvaluationWarning):  # fewer than 2048 images: FID is biased, which is fine here
        same = shapes_metric.sample_metrics(model, reference, samples, labels)
        shifted = shapes_metric.sample_metrics(model, reference, np.clip(samples.astype(int) + 60, 0, 255)
                                               .astype(np.uint8), labels)
        other = shapes_metric.sample_metrics(model, reference, shapes_metric.render_set(0, "train", 300, 32)[0])
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    # Another draw of the same distribution is much closer than the same images shifted in brightness.
    assert shifted["fid"] > 2 * other["fid"] > 0
    assert same["class_accuracy"] > 0.25 and "class_accuracy" not in other
    assert 1.0 < same["inception_score"] <= 8.0


def test_weights_directory_round_trip(classifier, tmp_path):
    model, _ = classifier
    shapes_classifier.save(model, tmp_path / "clf")
    loaded = shapes_classifier.load(tmp_path / "clf")
    assert loaded.config == model.config
    a, b = flat_variables(model), flat_variables(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
