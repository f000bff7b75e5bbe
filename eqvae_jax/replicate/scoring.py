"""Scoring every kept checkpoint of a generative run (DiT/SiT or MaskGIT) with the shapes classifier, one file per
checkpoint so that an interrupted stage resumes where it stopped: WORKDIR/sample_metrics/<update>.json (the
metrics) and <update>.npz (the first samples, for the report's grids)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from eqvae_jax.models.shapes_classifier import ShapesClassifier
from eqvae_jax.replicate.dit_samples import evaluate_checkpoint


class Sampler(Protocol):
    def samples(self, update: int) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


def score_checkpoints(sampler: Sampler, workdir: str, updates: Iterable[int], classifier: ShapesClassifier,
                      reference: np.ndarray, label: str) -> dict[str, dict[str, Any]]:
    """{update: metrics} of every checkpoint in `updates`, computing only those not scored yet; closes `sampler`."""
    scores_dir = os.path.join(workdir, "sample_metrics")
    os.makedirs(scores_dir, exist_ok=True)
    curve = {}
    try:
        for update in updates:
            path = os.path.join(scores_dir, f"{update}.json")
            if not os.path.isfile(path):
                metrics, images, labels = evaluate_checkpoint(sampler, update, classifier, reference)
                np.savez(os.path.join(scores_dir, f"{update}.npz"), images=images, labels=labels)
                with open(path, "w") as f:
                    json.dump(metrics, f)
                print(f"{label}: update {update}: shapes-FID {metrics['fid']:.3f}, precision "
                      f"{metrics['precision']:.3f}, recall {metrics['recall']:.3f}, class accuracy "
                      f"{metrics['class_accuracy']:.3f}")
            with open(path) as f:
                curve[str(update)] = json.load(f)
    finally:
        sampler.close()
    return curve
