"""Run a job's input pipeline alone: images/s, skip counts, and a PNG grid of the first batch.

    python -m eqvae_jax.data --config=configs/<job>.py [--config.data.<field>=...] --batches 20

Reads the job config's `data` section (eqvae_jax/data/config.py) and its `global_batch_size`.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from eqvae_jax import cli
from eqvae_jax.data.config import as_data_config
from eqvae_jax.data.iterator import build_train_iterator
from eqvae_jax.images import from_unit_range, square_grid
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.typed_config import ConfigError, positive

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "job config file with a `data` field", lock_config=True
)
_BATCHES = flags.DEFINE_integer("batches", 20, "batches to time after the first one")
_GRID = flags.DEFINE_string("grid", "data_first_batch.png", "where to write the PNG grid of the first batch")


def main(argv: list[str]) -> None:
    del argv
    try:
        data = as_data_config(_CONFIG.value.data)
    except ConfigError as e:
        cli.fail(e.problems)
    problems = data.problems() + positive(("global_batch_size", _CONFIG.value.global_batch_size))
    if problems:
        cli.fail(problems)
    try:  # the pipeline only needs the batch axes of a mesh
        iterator = build_train_iterator(data, make_mesh(-1, 1), _CONFIG.value.global_batch_size)
    except FileNotFoundError as e:  # a TFDS dataset not prepared, or prepared as TFRecord: what to run
        cli.fail(str(e))
    try:
        start = time.perf_counter()
        first = next(iterator)
        first_s = time.perf_counter() - start
        images = np.asarray(jax.device_get(first["image"]))
        if jax.process_index() == 0:
            Image.fromarray(square_grid(from_unit_range(images), len(images))).save(_GRID.value)
        start = time.perf_counter()
        for _ in range(_BATCHES.value):
            batch = next(iterator)
        if _BATCHES.value:
            jax.block_until_ready(batch["image"])
        seconds = time.perf_counter() - start
        per_host = _BATCHES.value * iterator.global_batch_size / jax.process_count()
        print(
            f"source={data.source} image_size={data.image_size} transform={data.transform} "
            f"workers={data.worker_count} global_batch={iterator.global_batch_size}"
        )
        print(f"first batch: {first_s:.2f} s (includes worker start-up)")
        if _BATCHES.value:
            print(f"images/s per host: {per_host / seconds:.1f} over {_BATCHES.value} batches")
        print(f"skipped: {iterator.skip_counts}")
        print(f"first batch grid: {_GRID.value}")
    finally:
        iterator.close()


if __name__ == "__main__":
    cli.run(main)
