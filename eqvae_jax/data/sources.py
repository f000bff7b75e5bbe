"""Random-access sources of encoded images: a TFDS ArrayRecord split, a folder searched recursively, or the
procedural `shapes` figures (data/shapes.py).

Every source returns records {'bytes': encoded image or b'' when unreadable, 'label': int (-1 = none),
'name': str}; decoding happens later, in the Grain workers, so a bad file costs one skip, not a crash.
Sources are picklable so Grain worker processes can open them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eqvae_jax.data.config import DataConfig
from eqvae_jax.data.shapes import ShapesSource

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

Record = dict[str, Any]


class FolderSource:
    """All jpg/jpeg/png/webp files under `root` (recursive, sorted); label = parent folder's class index."""

    def __init__(self, root: str, label_from_parent: bool = True) -> None:
        path = Path(root).expanduser()
        if not root or not path.is_dir():
            raise FileNotFoundError(f"image folder {str(path)!r} does not exist or is not a directory")
        files = sorted(
            os.path.relpath(os.path.join(dirpath, name), path)
            for dirpath, _, names in os.walk(path, followlinks=True)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise FileNotFoundError(
                f"image folder {str(path)!r} contains no {'/'.join(IMAGE_EXTENSIONS)} files"
            )
        self.root = str(path)
        self.files = files
        self.class_names: list[str] = sorted({os.path.dirname(f) for f in files}) if label_from_parent else []
        class_index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [class_index[os.path.dirname(f)] if label_from_parent else -1 for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        name = self.files[index]
        try:
            with open(os.path.join(self.root, name), "rb") as f:
                data = f.read()
        except OSError:
            return {"bytes": b"", "label": self.labels[index], "name": name, "unreadable": True}
        return {"bytes": data, "label": self.labels[index], "name": name, "unreadable": False}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, {len(self)} files)"


class DatasetFormatError(FileNotFoundError):
    """A TFDS dataset is prepared, but in a format without random access (TFRecord, TFDS's default)."""


class TfdsSource:
    """One split of a TFDS dataset prepared in ArrayRecord format, images left encoded (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str) -> None:
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared under {builder.data_dir!r} "
                f"(data_dir={data_dir or '$TFDS_DATA_DIR/~/tensorflow_datasets'}); "
                "see `python -m eqvae_jax.data.imagenet --help` for ImageNet"
            )
        proto = builder.info.as_proto
        formats = {proto.file_format or "tfrecord", *proto.alternative_file_formats}
        random_access = {f.value for f in tfds.core.file_adapters.FileFormat.with_random_access()}
        if not formats & random_access:
            have = ", ".join(sorted(formats))
            raise DatasetFormatError(
                f"TFDS dataset {name!r} at {builder.data_dir!r} is prepared as {have}, which Grain cannot read "
                "(it needs random access: ArrayRecord). Convert it in place, without downloading again:\n"
                f"  python -m eqvae_jax.data.tfds_convert {builder.data_dir}"
            )
        if not {f.value for f in builder.info.available_file_formats()} & random_access:
            # converted by tfds_convert: the registered builder ignores dataset_info.json's alternative formats
            builder = tfds.builder_from_directory(builder.data_dir)
        if split not in builder.info.splits:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} at {builder.data_dir!r} has no split {split!r} "
                f"(has {sorted(builder.info.splits)})"
            )
        self._source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        if len(self._source) == 0:
            raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} at {builder.data_dir!r} is empty")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        record = self._source[index]
        name = record.get("file_name", str(index))
        name = name.decode() if isinstance(name, bytes) else str(name)
        return {
            "bytes": record["image"],
            "label": int(record.get("label", -1)),
            "name": name,
            "unreadable": False,
        }

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} records)"


def default_data_dir(config: DataConfig) -> str:
    """The TFDS data dir for this config ('' lets TFDS use $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    if config.data_dir:
        return os.path.expanduser(config.data_dir)
    if config.source == "demo":
        return os.path.join(cache_dir(), "tfds")
    return ""


def cache_dir() -> str:
    """Where prepared data lives by default: $XDG_CACHE_HOME/eqvae_jax, else ~/.cache/eqvae_jax (never the
    directory a command happens to run from)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eqvae_jax")


def open_source(config: DataConfig, train: bool) -> FolderSource | TfdsSource | ShapesSource:
    """The training (`train=True`) or held-out eval source named by the data config."""
    if config.source == "folder":
        root = config.folder if train else config.eval_folder
        if not train and not root:
            raise FileNotFoundError(
                "data.eval_folder is empty: the folder source has no held-out eval images"
            )
        return FolderSource(root, config.label_from_parent)
    split = config.train_split if train else config.eval_split
    if config.source == "tfds":
        return TfdsSource(config.tfds_name, split, default_data_dir(config))
    if config.source == "demo":
        from eqvae_jax.data import demo

        data_dir = default_data_dir(config)
        demo.prepare(data_dir)
        return TfdsSource(demo.NAME, "train" if train else "validation", data_dir)
    if config.source == "shapes":
        return ShapesSource("train" if train else "validation", config.shapes_size or config.image_size,
                            config.shapes_train_size if train else config.shapes_eval_size, config.shapes_seed)
    raise ValueError(f"unknown data.source {config.source!r}; expected 'tfds', 'folder', 'demo' or 'shapes'")
