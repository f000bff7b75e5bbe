"""The TensorBoard writer without TensorFlow (train/event_file.py, train/metrics.py), read back by TensorBoard's own
event reader (with TensorFlow's record reader, which checks every CRC)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clu import asynclib
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2

from eqvae_jax.train import metrics
from eqvae_jax.train.event_file import FILE_VERSION, EventFileWriter, masked_crc32c
from eqvae_jax.train.metrics_file import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(logdir: str) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.IMAGES: 0,
                                                                    event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_records_are_what_tensorflows_reader_accepts_and_checks(tmp_path):
    """TensorFlow's own TFRecord reader (test-only here) reads our framing, and a flipped payload byte fails its
    CRC check: the checksums are computed as TensorFlow computes them."""
    import tensorflow as tf

    writer = EventFileWriter(str(tmp_path))
    writer.write_scalars(7, {"loss": 0.25})
    writer.close()
    events = [event_pb2.Event.FromString(r) for r in tf.compat.v1.io.tf_record_iterator(writer.path)]
    assert events[0].file_version == FILE_VERSION
    assert events[1].step == 7 and events[1].summary.value[0].simple_value == 0.25
    path = Path(writer.path)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0x01  # inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.compat.v1.io.tf_record_iterator(writer.path))
    assert masked_crc32c(b"") != 0


def test_scalars_and_images_read_back_by_tensorboard(tmp_path):
    writer = metrics.create_writer(str(tmp_path))
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (20, 30, 3), np.uint8)
    floats = rng.random((2, 8, 6, 3), np.float32)
    for step in (1, 2, 5):
        writer.write_scalars(step, {"g/loss": 1.0 / step, "lr": np.float32(3e-4)})
    writer.write_images(5, {"reconstructions": grid[None], "samples": floats})
    writer.flush()
    writer.close()

    acc = load(str(tmp_path / metrics.TENSORBOARD_DIR))
    loss = acc.Scalars("g/loss")
    assert [e.step for e in loss] == [1, 2, 5]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 0.2], rtol=1e-6)
    assert acc.Scalars("lr")[0].value == pytest.approx(3e-4)
    (image,) = acc.Images("reconstructions")
    assert image.step == 5 and (image.height, image.width) == (20, 30)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid)
    second = np.asarray(Image.open(io.BytesIO(acc.Images("samples/1")[0].encoded_image_string)))
    np.testing.assert_array_equal(second, (floats[1] * 255 + 0.5).astype(np.uint8))
    # the JSON lines beside it
    rows = read_metrics(str(tmp_path))
    assert [r["update"] for r in rows] == [1, 2, 5]


def test_two_writers_in_one_directory_make_two_files(tmp_path):
    first, second = EventFileWriter(str(tmp_path)), EventFileWriter(str(tmp_path))
    first.write_scalars(0, {"a": 1.0})
    second.write_scalars(0, {"b": 2.0})
    for w in (first, second):
        w.close()
    assert len(os.listdir(tmp_path)) == 2
    assert set(load(str(tmp_path)).Tags()["scalars"]) == {"a", "b"}  # one run, both files read


def test_an_error_in_the_background_writer_reaches_the_caller(tmp_path):
    writer = metrics.AsyncWriter(EventFileWriter(str(tmp_path)))
    writer.write_images(0, {"bad": np.zeros((2, 2, 2, 2, 2))})  # PIL cannot encode a 4-D image
    with pytest.raises(asynclib.AsyncError, match="ASYNCHRONOUSLY"):
        writer.flush()
    writer.close()


def test_a_job_process_does_not_import_tensorflow():
    """The jobs write TensorBoard without TensorFlow (about 3 s of every job's start)."""
    code = ("import sys; import eqvae_jax.train.eqvae.job, eqvae_jax.train.dit.job, eqvae_jax.train.maskgit.job, "
            "eqvae_jax.train.eval_vae.job; print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
