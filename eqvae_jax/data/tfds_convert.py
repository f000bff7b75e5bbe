"""A TFDS dataset prepared as TFRecord (TFDS's default) made readable by Grain: ArrayRecord shards beside it.

    python -m eqvae_jax.data.tfds_convert DATASET_VERSION_DIR      # e.g. gs://bucket/tfds/imagenet2012/5.1.0

Grain needs random access, which TFRecord files lack. Each `<name>-<split>.tfrecord-XXXXX-of-YYYYY` shard is
copied record by record (the serialized examples unchanged, so nothing is decoded or downloaded) into
`<name>-<split>.array_record-XXXXX-of-YYYYY`, and dataset_info.json then lists array_record among the
dataset's file formats; the TFRecord shards stay. TFDS's own `tfds convert_format` does the same but needs
Apache Beam installed; this needs neither Beam nor TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from collections.abc import Iterator

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from eqvae_jax import storage

TFRECORD, ARRAY_RECORD = ".tfrecord-", ".array_record-"


def read_tfrecord(path: epath.Path) -> Iterator[bytes]:
    """The records of a TFRecord file: each is length (uint64) | its CRC | data | the data's CRC."""
    with path.open("rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(header) < 12 or len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"{path}: truncated TFRecord file")
            yield data


def convert(version_dir: str) -> list[str]:
    """Write the ArrayRecord twin of every TFRecord shard in `version_dir` and list the format in its
    dataset_info.json; returns the shards written (a twin already complete is kept)."""
    root = epath.Path(version_dir)
    info_path = root / "dataset_info.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{root} is not a prepared TFDS dataset version (no dataset_info.json)")
    info = json.loads(info_path.read_text())
    shards = sorted(p for p in root.iterdir() if TFRECORD in p.name)
    if not shards:
        raise FileNotFoundError(f"{root} has no TFRecord shards (*{TFRECORD}*)")
    written = []
    for shard in shards:
        out = root / shard.name.replace(TFRECORD, ARRAY_RECORD)
        if out.exists():
            continue
        with storage.atomic_file(os.fspath(out)) as tmp:  # ArrayRecord writes local files; gs:// gets one upload
            writer = ArrayRecordWriter(tmp, "group_size:1")  # TFDS's own options for its array_record shards
            for record in read_tfrecord(shard):
                writer.write(record)
            writer.close()
        written.append(str(out))
    formats = set(info.get("alternativeFileFormats", [])) | {"array_record"}
    info["alternativeFileFormats"] = sorted(formats - {info.get("fileFormat")})
    storage.write_atomic(info_path, json.dumps(info, indent=2).encode())
    return written


def main(argv: list[str] | None = None) -> None:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_version_dir", help="e.g. ~/tensorflow_datasets/imagenet2012/5.1.0")
    args = parser.parse_args(argv)
    try:
        written = convert(args.dataset_version_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{len(written)} ArrayRecord shards written in {args.dataset_version_dir}")


if __name__ == "__main__":
    main()
