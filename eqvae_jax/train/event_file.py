"""TensorBoard event files, written without TensorFlow.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, payload, masked CRC-32C of the
payload), each an `Event` proto; the first says the file format version. Scalars are written as `simple_value`
and images as PNG-encoded `Summary.Image`: the forms TensorBoard has read since TF1 (and the ones PyTorch's
SummaryWriter writes). clu's SummaryWriter writes through TensorFlow, whose import alone is about 3 s of every
job's start on a CPU; this writer needs only TensorBoard's protos. Local files only: a gs:// run writes into a
local staging directory that is copied up (`train.metrics.StagedWriter`).
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import google_crc32c
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2

FILE_VERSION = "brain.Event:2"
_file_numbers = itertools.count()  # distinct names for files opened in the same second by one process


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant (so a CRC of CRCs is not 0)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: little-endian uint64 length, its masked CRC, the payload, the payload's masked CRC."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def png_bytes(image: np.ndarray) -> tuple[bytes, int, int, int]:
    """An HWC (or HW) image, uint8 or float in [0, 1], as (PNG bytes, height, width, channels)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    channels = 1 if image.ndim == 2 else image.shape[-1]
    return out.getvalue(), image.shape[0], image.shape[1], channels


class EventFileWriter:
    """Scalars and images into a new event file in `logdir` (created if missing); `flush` makes them readable."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_file_numbers)}.v2")
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "wb")  # noqa: SIM115 (open until close())
        self._write(event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION))
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        self._file.write(tfrecord(event.SerializeToString()))

    def _write_values(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        summary = summary_pb2.Summary(value=values)
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write_values(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                  for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value is one image (HWC) or a batch (NHWC); a batch of N > 1 is written as tags `name/i`."""
        values = []
        for name, batch in images.items():
            batch = np.asarray(batch)
            batch = batch[None] if batch.ndim == 3 else batch
            for i, image in enumerate(batch):
                encoded, height, width, channels = png_bytes(image)
                tag = name if len(batch) == 1 else f"{name}/{i}"
                values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
                    height=height, width=width, colorspace=channels, encoded_image_string=encoded)))
        self._write_values(step, values)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
