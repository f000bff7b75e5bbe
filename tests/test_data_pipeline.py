"""Pipeline behaviour: resume gives bit-identical batches (with and without worker processes, also through
an Orbax CheckpointManager), per-process shards do not overlap, uint8 and float32 outputs agree."""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from PIL import Image

from eqvae_jax.data import config as data_config
from eqvae_jax.data import pipeline
from eqvae_jax.data.iterator import build_eval_iterator, build_train_iterator
from eqvae_jax.data.sources import FolderSource

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        os.makedirs(root / f"class{i % 3}", exist_ok=True)
        pixels = rng.integers(0, 256, (36 + i, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % 3}" / f"{i:02d}.png")
    (root / "class0" / "broken.jpg").write_bytes(b"not an image")
    return str(root)


def _config(root: str, workers: int = 0) -> data_config.ml_collections.ConfigDict:
    c = data_config.get_config()
    c.source, c.folder, c.eval_folder, c.image_size, c.min_side = "folder", root, root, 16, 8
    c.worker_count, c.read_threads, c.prefetch, c.flip = workers, 1, 2, True
    return c


def _mesh() -> jax.sharding.Mesh:
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(auto, auto))


def _host(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items()}


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_gives_bit_identical_batches(folder, workers):
    config = _config(folder, workers)
    first = build_train_iterator(config, _mesh(), 8)
    for _ in range(3):  # crosses an epoch boundary (16 images) and the broken file
        next(first)
    state = first.get_state()
    expected = [_host(next(first)) for _ in range(4)]
    skips = first.skip_counts
    first.close()

    again = build_train_iterator(config, _mesh(), 8)
    again.set_state(state)
    _assert_same([_host(next(again)) for _ in range(4)], expected)
    assert again.skip_counts == skips
    again.close()


def test_iterator_state_round_trips_through_orbax(folder, tmp_path):
    config = _config(folder)
    iterator = build_train_iterator(config, _mesh(), 8)
    next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1))
    step = {"step": np.zeros((), np.int32)}
    manager.save(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(step), data=grain.checkpoint.CheckpointSave(iterator)
        ),
    )
    manager.wait_until_finished()
    expected = [_host(next(iterator)) for _ in range(2)]

    fresh = build_train_iterator(config, _mesh(), 8)
    restored = manager.restore(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(step), data=grain.checkpoint.CheckpointRestore(fresh)
        ),
    )
    assert restored.data is fresh
    _assert_same([_host(next(fresh)) for _ in range(2)], expected)
    manager.close()


def test_process_shards_are_disjoint_and_cover_each_epoch(folder):
    config = _config(folder)
    config.num_epochs, config.drop_remainder = 1, False
    source = FolderSource(folder)
    good = {i for i, f in enumerate(source.files) if not f.endswith("broken.jpg")}

    def indices(process_index: int, process_count: int) -> list[int]:
        batches = pipeline.train_dataset(config, source, 1, process_index, process_count)
        return [int(i) for b in batches for i in b["index"]]

    shards = [indices(p, 2) for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(good)

    config.num_epochs = 2
    both = indices(0, 1)
    assert sorted(both[:16]) == sorted(both[16:]) == sorted(good)
    assert both[:16] != both[16:]  # each epoch is reshuffled


def test_uint8_on_device_scaling_equals_float32_from_workers(folder):
    config = _config(folder)
    as_uint8 = next(build_train_iterator(config, _mesh(), 8))
    config.output_dtype = "float32"
    as_float = next(build_train_iterator(config, _mesh(), 8))
    np.testing.assert_array_equal(np.asarray(as_uint8["image"]), np.asarray(as_float["image"]))
    assert as_uint8["image"].dtype == as_float["image"].dtype == np.float32
    assert float(np.asarray(as_uint8["image"]).max()) <= 1.0


def test_eval_is_finite_deterministic_and_padded(folder):
    config = _config(folder)
    passes = [[_host(b) for b in build_eval_iterator(config, _mesh(), 8)] for _ in range(2)]
    _assert_same(*passes)
    masks = np.concatenate([b["mask"] for b in passes[0]])
    assert masks.shape == (24,) and masks.sum() == 16  # 17 files (one broken) padded to 3 batches of 8
