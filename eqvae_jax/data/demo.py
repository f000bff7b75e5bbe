"""The embedded demo set: the photographs in data/demo_images as a TFDS ArrayRecord dataset.

It goes through the same TFDS/ArrayRecord path as ImageNet, so the demo exercises the production reader.
Preparing needs no TensorFlow and no network: the builder hands TFDS encoded JPEG bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from eqvae_jax import storage
from eqvae_jax.data import tfds_prepare
from eqvae_jax.parallel.coordination import make_once

NAME = "eqvae_demo"
IMAGES_DIR = Path(__file__).parent / "demo_images"
# Held out for eval; the rest are training photographs (see demo_images/LICENSES.md).
EVAL_PHOTOS: tuple[str, ...] = ("coffee", "rocket")


def photo_names() -> list[str]:
    """Names (file stems) of the shipped photographs, sorted; their index is the label."""
    return sorted(p.stem for p in IMAGES_DIR.glob("*.jpg"))


class EqvaeDemo(tfds.core.GeneratorBasedBuilder):
    """Nine public-domain / CC0 photographs; one class per photograph."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Seven training and two held-out photographs from scikit-image's sample data."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=photo_names()),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager
        names = photo_names()
        return {
            "train": self._generate_examples([n for n in names if n not in EVAL_PHOTOS]),
            "validation": self._generate_examples([n for n in names if n in EVAL_PHOTOS]),
        }

    def _generate_examples(self, names: list[str]):
        for name in names:
            data = (IMAGES_DIR / f"{name}.jpg").read_bytes()  # bytes: TFDS needs no TensorFlow to store them
            yield name, {"image": data, "label": name, "file_name": f"{name}.jpg"}


def prepare(data_dir: str) -> str:
    """Prepare the demo set under `data_dir` as ArrayRecord if not done yet; returns the dataset directory.

    In a multi-process job process 0 prepares while the others wait, then they open its copy (or, on a
    host-local data_dir, prepare their own). Any processes preparing the same data_dir at once are safe too:
    a lost final rename counts as success (`tfds_prepare.download_and_prepare`)."""
    if not IMAGES_DIR.is_dir() or not photo_names():
        raise FileNotFoundError(f"demo photographs missing: {str(IMAGES_DIR)!r} has no .jpg files")
    return make_once("the demo dataset", lambda: _prepare(data_dir))


def _prepare(data_dir: str) -> str:
    if not storage.is_url(data_dir):
        os.makedirs(data_dir, exist_ok=True)
    tfds.disable_progress_bar()  # nine photographs: the job's own log says what happens
    builder = tfds_prepare.download_and_prepare(
        lambda target: EqvaeDemo(data_dir=target, file_format="array_record"), data_dir,
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS),
    )
    return str(builder.data_dir)
