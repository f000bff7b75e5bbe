"""Prepare TFDS `imagenet2012` as ArrayRecord from the manual-download tars, without TensorFlow.

    python -m eqvae_jax.data.imagenet --manual_dir=/path/with/tars --data_dir=gs://bucket/tfds

`manual_dir` holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and optionally
ILSVRC2012_img_test.tar). The result is the standard `imagenet2012/5.1.0` ArrayRecord dataset that
`tfds.data_source('imagenet2012')` and our pipeline read. TFDS's own builder needs TensorFlow only to
check files (tf.io.gfile) and to re-encode 22 CMYK JPEGs and one PNG in the train tar; this
subclass does the file access with etils.epath and the two image fixes with PIL.
The stock route works too on a machine with TensorFlow:
`tfds build imagenet2012 --file_format=array_record --manual_dir=... --data_dir=...`.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet

from eqvae_jax.data import tfds_prepare


def _reencode_jpeg(data: bytes) -> bytes:
    """Any image -> RGB JPEG (what TFDS does with TensorFlow for ImageNet's CMYK and PNG files)."""
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=100)
    return out.getvalue()


_SPLIT_FILES = (
    (tfds.Split.TRAIN, "ILSVRC2012_img_train.tar"),
    (tfds.Split.VALIDATION, "ILSVRC2012_img_val.tar"),
    (tfds.Split.TEST, "ILSVRC2012_img_test.tar"),
)


def _validation_labels(val_tar: epath.Path) -> dict[str, str]:
    """Validation file name -> synset: TFDS's label list, in the order of the sorted tar member names."""
    labels = (
        tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().strip().splitlines()
    )
    with val_tar.open("rb") as f, tarfile.open(mode="r:", fileobj=f) as tar:
        names = sorted(tar.getnames())
    return dict(zip(names, labels, strict=False))


def _iter_tar(path: epath.Path) -> Iterator[tuple[str, BinaryIO]]:
    """(member name, file object) for each file in a tar, streamed (TFDS would open it with tf.io.gfile)."""
    with path.open("rb") as f:
        yield from tfds.download.iter_archive(f, tfds.download.ExtractMethod.TAR_STREAM)


class Imagenet2012NoTF(tfds_imagenet.Builder, skip_registration=True):
    """The TFDS imagenet2012 builder with its two TensorFlow image fixes done by PIL; same name and files."""

    name = "imagenet2012"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> list:
        """As TFDS's, with local/epath file access instead of tf.io.gfile."""
        manual_dir = epath.Path(dl_manager.manual_dir)
        splits = []
        for split, filename in _SPLIT_FILES:
            path = manual_dir / filename
            if not path.exists():
                logging.warning("ImageNet %s split not found at %s; it will be missing", split, path)
                continue
            kwargs: dict = {}
            if split == tfds.Split.VALIDATION:
                kwargs["validation_labels"] = _validation_labels(path)
            elif split == tfds.Split.TEST:
                kwargs["labels_exist"] = False
            archive = _iter_tar(path)
            splits.append(tfds.core.SplitGenerator(name=split, gen_kwargs={"archive": archive, **kwargs}))
        if not splits:
            raise FileNotFoundError(
                f"no ILSVRC2012_img_{{train,val,test}}.tar in manual_dir {str(manual_dir)!r}"
            )
        return splits

    def _fix_image(self, image_fname: str, image: BinaryIO) -> BinaryIO:
        if image_fname in tfds_imagenet.CMYK_IMAGES or image_fname in tfds_imagenet.PNG_IMAGES:
            return io.BytesIO(_reencode_jpeg(image.read()))
        return image


def prepare_imagenet(manual_dir: str, data_dir: str) -> str:
    """Build imagenet2012 ArrayRecord files under data_dir from the tars in manual_dir; returns its dir."""
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"ImageNet manual_dir {manual_dir!r} does not exist")
    builder = tfds_prepare.download_and_prepare(
        lambda target: Imagenet2012NoTF(data_dir=target, file_format="array_record"), data_dir,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
    """CLI: prepare ImageNet from the manual-download tars."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual_dir", required=True, help="folder with ILSVRC2012_img_{train,val}.tar")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to write to (local path or gs://)")
    args = parser.parse_args(argv)
    print(prepare_imagenet(args.manual_dir, args.data_dir))


if __name__ == "__main__":
    main()
