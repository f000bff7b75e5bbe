"""The folder source through the real pipeline: every kind of bad file is converted or skipped and counted."""

import io
import os

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from eqvae_jax.data import config as data_config
from eqvae_jax.data import pipeline
from eqvae_jax.data.iterator import build_eval_iterator, build_train_iterator
from eqvae_jax.data.sources import FolderSource

flags.FLAGS.mark_as_parsed()


def _save(path: str, image: Image.Image, fmt: str, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt, **kw)


def _photo(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1] + (3,), dtype=np.uint8))


def make_bad_folder(root: str) -> dict[str, int]:
    """Good and convertible images in class folders plus one file of every unusable kind."""
    _save(f"{root}/cat/a.jpg", _photo(0), "JPEG")
    _save(f"{root}/cat/b.JPEG", _photo(1).convert("L"), "JPEG")  # grayscale
    _save(f"{root}/cat/c.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")  # CMYK
    _save(f"{root}/dog/d.png", _photo(2).convert("P"), "PNG")  # palette
    _save(f"{root}/dog/e.png", _photo(3).convert("RGBA"), "PNG")  # alpha
    _save(f"{root}/dog/deep/f.webp", _photo(4), "WEBP")  # nested; label from its own parent
    _save(f"{root}/dog/g.png", _photo(5, (20, 20)), "PNG")  # smaller than the 32 px crop: upscaled
    _save(f"{root}/dog/zz_last.jpg", _photo(8), "JPEG")  # sorts last: no skip trails the final image
    _save(f"{root}/dog/notes.txt", Image.new("RGB", (1, 1)), "PNG")  # not an image extension: ignored
    good = io.BytesIO()
    _photo(6).save(good, format="JPEG")
    with open(f"{root}/cat/truncated.jpg", "wb") as f:
        f.write(good.getvalue()[: len(good.getvalue()) // 2])
    with open(f"{root}/cat/corrupt.png", "wb") as f:
        f.write(b"definitely not an image")
    with open(f"{root}/cat/empty.jpg", "wb"):
        pass
    _save(f"{root}/dog/tiny.png", _photo(7, (4, 4)), "PNG")  # below min_side
    os.symlink(f"{root}/nowhere.jpg", f"{root}/dog/dangling.jpg")  # unreadable
    return {"unreadable": 1, "corrupt": 2, "truncated": 1, "too_small": 1, "unsupported_mode": 0}


def _config(root: str) -> data_config.ml_collections.ConfigDict:
    c = data_config.get_config()
    c.source, c.folder, c.eval_folder = "folder", root, root
    c.image_size, c.min_side = 32, 8
    c.worker_count, c.read_threads, c.prefetch = 0, 1, 1
    c.num_epochs, c.drop_remainder = 1, False
    return c


def _mesh() -> jax.sharding.Mesh:
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(auto, auto))


def test_folder_source_lists_recursively_with_parent_labels(tmp_path):
    make_bad_folder(str(tmp_path))
    source = FolderSource(str(tmp_path))
    assert len(source) == 13 and not any(f.endswith(".txt") for f in source.files)
    assert source.class_names == ["cat", "dog", os.path.join("dog", "deep")]
    assert source[source.files.index(os.path.join("dog", "deep", "f.webp"))]["label"] == 2
    assert FolderSource(str(tmp_path), label_from_parent=False)[0]["label"] == -1


def test_every_bad_file_is_converted_or_skipped_and_counted(tmp_path):
    expected = make_bad_folder(str(tmp_path))
    config = _config(str(tmp_path))
    config.shuffle = False  # source order, so the stream ends with a good image and every skip is reported
    source = FolderSource(config.folder)
    batches = list(pipeline.train_dataset(config, source, 2, 0, 1))
    sizes = [len(b["index"]) for b in batches]
    assert sizes == [2, 2, 2, 2]  # 8 usable images, always in full batches
    names = sorted(source.files[i] for b in batches for i in b["index"])
    assert names == sorted(
        os.path.join(*p.split("/"))
        for p in [
            "cat/a.jpg",
            "cat/b.JPEG",
            "cat/c.jpg",
            "dog/d.png",
            "dog/e.png",
            "dog/deep/f.webp",
            "dog/g.png",
            "dog/zz_last.jpg",
        ]
    )
    counts = sum(b["skips"].sum(axis=0) for b in batches)
    assert dict(zip(pipeline.SKIP_REASONS, counts.tolist(), strict=True)) == expected
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == (32, 32, 3)


def test_global_iterator_counts_skips_and_never_shrinks_a_batch(tmp_path):
    expected = make_bad_folder(str(tmp_path))
    config = _config(str(tmp_path))
    config.num_epochs, config.drop_remainder = 2, True
    iterator = build_train_iterator(config, _mesh(), 8)
    batches = list(iterator)
    assert len(batches) == 2  # 16 usable over two epochs: two full batches of 8
    image = batches[0]["image"]
    assert image.shape == (8, 32, 32, 3) and image.dtype == np.float32
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    assert image.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    # The skips that preceded the yielded batch are counted (the rest belong to the dropped remainder).
    assert all(iterator.skip_counts[k] <= 2 * v for k, v in expected.items())
    assert sum(iterator.skip_counts.values()) >= 1


def test_eval_masks_bad_images_instead_of_dropping_them(tmp_path):
    make_bad_folder(str(tmp_path))
    iterator = build_eval_iterator(_config(str(tmp_path)), _mesh(), 8)
    batches = list(iterator)
    assert len(batches) == iterator.num_batches == 2  # 13 files padded to 16
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert mask.sum() == 8 and mask.shape == (16,)
    assert sum(iterator.skip_counts.values()) == 5


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FolderSource(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="empty"):
        build_train_iterator(_config(str(tmp_path / "empty")), _mesh(), 8)
