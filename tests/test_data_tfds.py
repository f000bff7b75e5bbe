"""TFDS sources: a tiny fake ImageNet in the manual-download layout, prepared without TensorFlow and read
through the real pipeline; the embedded demo set."""

import io
import os
import subprocess
import sys
import tarfile
import tempfile

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from eqvae_jax.data import config as data_config
from eqvae_jax.data import demo, tfds_convert
from eqvae_jax.data.iterator import build_eval_iterator, build_train_iterator
from eqvae_jax.data.sources import DatasetFormatError, TfdsSource, default_data_dir

flags.FLAGS.mark_as_parsed()

# Real synsets (labels 0, 1 and the ones TFDS fixes: a CMYK file and a PNG file named .JPEG).
_TRAIN = {
    "n01440764": ["n01440764_1.JPEG", "n01440764_2.JPEG"],
    "n01443537": ["n01443537_1.JPEG"],
    "n01739381": ["n01739381_1309.JPEG"],  # in TFDS's CMYK_IMAGES
    "n02105855": ["n02105855_2933.JPEG"],  # in TFDS's PNG_IMAGES
}


def _bytes(name: str, seed: int) -> bytes:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    out = io.BytesIO()
    if name == "n01739381_1309.JPEG":
        image.convert("CMYK").save(out, format="JPEG")
    elif name == "n02105855_2933.JPEG":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_fake_imagenet(manual_dir: str) -> None:
    """ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar (flat), as downloaded."""
    os.makedirs(manual_dir)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
        for i, (synset, files) in enumerate(_TRAIN.items()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for j, name in enumerate(files):
                    _add(t, name, _bytes(name, 10 * i + j))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for k in range(1, 4):
            _add(val, f"ILSVRC2012_val_{k:08d}.JPEG", _bytes("val", 100 + k))


def _mesh() -> jax.sharding.Mesh:
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(auto, auto))


# Runs in a fresh interpreter where `import tensorflow` fails: preparing and reading must not need it,
# even on a machine where TensorFlow happens to be installed (TFDS would use it when importable).
_NO_TF_SCRIPT = """
import importlib.abc
import importlib.util
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, NoTensorFlow())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "tensorflow" else _find_spec(name, *a)
from absl import flags
flags.FLAGS.mark_as_parsed()
import jax
from eqvae_jax.data import config as data_config
from eqvae_jax.data.imagenet import prepare_imagenet
from eqvae_jax.data.iterator import build_train_iterator
prepare_imagenet(sys.argv[1], sys.argv[2])
config = data_config.get_config()
config.data_dir, config.image_size, config.worker_count, config.read_threads = sys.argv[2], 16, 0, 1
batch = next(build_train_iterator(config, jax.make_mesh((8, 1), ("data", "fsdp")), 8))
assert "tensorflow" not in sys.modules
print("read", batch["image"].shape)
"""


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("imagenet")
    make_fake_imagenet(str(root / "manual"))
    result = subprocess.run(
        [sys.executable, "-c", _NO_TF_SCRIPT, str(root / "manual"), str(root / "tfds")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read (8, 16, 16, 3)" in result.stdout
    return str(root / "tfds")


def test_fake_imagenet_prepares_as_array_record_without_tensorflow(imagenet_dir):
    files = os.listdir(os.path.join(imagenet_dir, "imagenet2012", "5.1.0"))
    assert any(".array_record" in f and "train" in f for f in files)
    source = TfdsSource("imagenet2012", "train", imagenet_dir)
    records = {source[i]["name"]: source[i] for i in range(len(source))}
    assert len(records) == 5
    assert records["n01440764_2.JPEG"]["label"] == 0 and records["n01443537_1.JPEG"]["label"] == 1
    for name in ("n01739381_1309.JPEG", "n02105855_2933.JPEG"):  # re-encoded by PIL as RGB JPEG
        image = Image.open(io.BytesIO(records[name]["bytes"]))
        assert image.format == "JPEG" and image.mode == "RGB"


def test_fake_imagenet_through_the_pipeline(imagenet_dir):
    config = data_config.get_config()
    config.data_dir, config.image_size, config.worker_count, config.read_threads = imagenet_dir, 32, 0, 1
    config.num_epochs = 3  # 15 images -> one global batch of 8 (the partial remainder dropped)
    batches = list(build_train_iterator(config, _mesh(), 8))
    assert len(batches) == 1
    assert batches[0]["image"].shape == (8, 32, 32, 3)
    assert set(np.asarray(batches[0]["label"]).tolist()) <= {0, 1, 59, 230}  # the four synsets' indices
    evaluation = list(build_eval_iterator(config, _mesh(), 8))
    assert len(evaluation) == 1 and int(np.asarray(evaluation[0]["mask"]).sum()) == 3


def test_missing_tfds_dataset_names_the_path(tmp_path):
    config = data_config.get_config()
    config.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(FileNotFoundError, match="no_tfds_here"):
        build_train_iterator(config, _mesh(), 8)


def test_demo_set_is_prepared_on_first_use_and_holds_out_eval_photos(tmp_path):
    config = data_config.get_config()
    config.source, config.data_dir, config.image_size = "demo", str(tmp_path), 32
    config.worker_count, config.read_threads, config.repeats_per_epoch = 0, 1, 2
    iterator = build_train_iterator(config, _mesh(), 8)
    batch = next(iterator)
    iterator.close()
    assert os.path.isdir(tmp_path / demo.NAME / "1.0.0")
    names = demo.photo_names()
    eval_labels = {names.index(n) for n in demo.EVAL_PHOTOS}
    assert not set(np.asarray(batch["label"]).tolist()) & eval_labels
    evaluation = list(build_eval_iterator(config, _mesh(), 8))
    labels = np.asarray(evaluation[0]["label"])[np.asarray(evaluation[0]["mask"])]
    assert sorted(labels.tolist()) == sorted(eval_labels)
    assert len(TfdsSource(demo.NAME, "train", str(tmp_path))) == len(names) - len(demo.EVAL_PHOTOS)


def test_demo_preparation_is_quiet_and_lives_under_the_cache_dir(tmp_path, monkeypatch, capfd, caplog):
    """No TFDS 'Downloading and preparing' lines nor its 'no dataset_info.json' warning; the default data dir is
    $XDG_CACHE_HOME/eqvae_jax/tfds, not the working directory; no empty downloads/ tree and no temporary directory
    is left."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # what the command's $TMPDIR would be
    config = data_config.as_data_config({"source": "demo"})
    data_dir = default_data_dir(config)
    assert data_dir == str(tmp_path / "cache" / "eqvae_jax" / "tfds")
    demo.prepare(data_dir)
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        assert "Downloading and preparing" not in text and "dataset_info.json" not in text, text
    assert os.listdir(data_dir) == [demo.NAME]
    assert sorted(os.listdir(tmp_path)) == ["cache", "tmp"]
    assert os.listdir(tmp_path / "tmp") == []  # TFDS's first-build temp dir is not left behind
    assert tempfile.gettempdir() == str(tmp_path / "tmp")


def test_tfrecord_dataset_names_the_conversion_which_makes_it_readable(tmp_path):
    """TFDS's default format has no random access: the error names the command; after it, the same records."""
    data_dir = str(tmp_path / "tfds")
    demo.EqvaeDemo(data_dir=data_dir, file_format="tfrecord").download_and_prepare()
    version_dir = os.path.join(data_dir, demo.NAME, "1.0.0")
    with pytest.raises(DatasetFormatError, match=f"prepared as tfrecord.*\n  python -m eqvae_jax.data.tfds_convert "
                                                 f"{version_dir}$"):
        TfdsSource(demo.NAME, "train", data_dir)
    tfds_convert.main([version_dir])
    converted = TfdsSource(demo.NAME, "train", data_dir)
    reference = TfdsSource(demo.NAME, "train", demo.prepare(str(tmp_path / "array_record")).rsplit("/", 2)[0])
    assert len(converted) == len(reference) == len(demo.photo_names()) - len(demo.EVAL_PHOTOS)
    for i in range(len(reference)):
        assert converted[i] == reference[i]
