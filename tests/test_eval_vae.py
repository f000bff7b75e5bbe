"""The reconstruction evaluation (`python -m eqvae_jax.eval_vae`, configs/eval_vae.py:tiny: a tiny random KL and VQ
model on the nine embedded photos at 32 px, tiny random Inception and LPIPS, 8 fake devices, two shards).

A run stopped after its first shard (as a preemption would) and restarted computes only the second shard, a shard
file left without its completion marker (killed while writing) is recomputed, and the resumed results equal a
fresh uninterrupted run of the CLI in a subprocess. The per-image numbers are recomputed outside the pipeline from
the stored crops: the crops are torchvision Resize + CenterCrop of the photos, the KL reconstruction decodes a
posterior sample with the documented per-position noise, and PSNR, equivariance error, Inception features and
TwoNN match. A workdir of another configuration, and bad configs, are clear errors; the rFID preprocessing option
reaches the Inception, its fingerprint (so shards of the two never mix) and the report."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, jax_cache, load_config
from PIL import Image

from eqvae_jax.data.demo import EVAL_PHOTOS, IMAGES_DIR
from eqvae_jax.data.transforms import resize_center_crop
from eqvae_jax.eval import equivariance as eq_eval
from eqvae_jax.eval import inception, latents, reconstruction
from eqvae_jax.eval.features import InceptionExtractor
from eqvae_jax.models import kl_vae
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.train.eval_vae import report
from eqvae_jax.train.eval_vae.config import parse_config
from eqvae_jax.train.eval_vae.job import build_inception, run
from eqvae_jax.train.eval_vae.shards import ShardMismatchError, ShardPlan, ShardStore
from eqvae_jax.typed_config import ConfigError

SUITE_SECONDS = 90  # rough wall time on 2 cores: conftest starts the longest modules first


def _tiny(compile_cache: str, **changes):
    return load_config("eval_vae", "tiny", compilation_cache_dir=compile_cache, **changes)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An interrupted, then resumed, tiny evaluation: (config, workdir, compile cache, the two call summaries)."""
    cache = jax_cache()
    workdir = tmp_path_factory.mktemp("eval_vae")
    config = _tiny(cache)
    first = run(config, str(workdir), stop_after_shards=1)
    # Killed while writing shard 1 of `kl`: arrays on disk, no completion marker.
    (workdir / "shards" / "kl").mkdir(parents=True, exist_ok=True)
    (workdir / "shards" / "kl" / "shard-00001.npz").write_bytes(b"half a file")
    second = run(config, str(workdir))
    return config, workdir, cache, first, second


def test_resume_restarts_from_the_last_shard_and_equals_a_fresh_cli_run(resumed, tmp_path):
    config, workdir, cache, first, second = resumed
    assert first["stopped"] and first["computed"] == [0] and first["results"] is None
    assert second["computed"] == [1] and not second["stopped"]
    for owner in ("_originals", "kl", "vq"):
        assert sorted(p.name for p in (workdir / "shards" / owner).iterdir()) == [
            "shard-00000.json", "shard-00000.npz", "shard-00001.json", "shard-00001.npz"]
    results = second["results"]
    assert set(results) == {"kl", "vq"}
    for name, r in results.items():
        assert r["images"] == 9 and r["id_images"] == 9
        for key in ("rfid", "psnr", "ssim", "lpips", "intrinsic_dimension", "equivariance/rotation",
                    "equivariance/scale", "equivariance/rot90", "equivariance/scale0.5"):
            assert np.isfinite(r[key]), (name, key)
        assert r["rfid"] > 0
    assert "equivariance/codes/rotation" in results["vq"] and "equivariance/codes/rotation" not in results["kl"]
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["kl"]["psnr"] == pytest.approx(results["kl"]["psnr"])
    per_model = json.loads((workdir / "results" / "vq.json").read_text())
    assert per_model["spec"]["kind"] == "vq_vae" and per_model["fid_preprocess"] == "adm"  # which rFID this is
    png = Image.open(workdir / "comparison.png")
    assert png.size[0] > 400 and png.size[1] > 400
    for name in ("kl", "vq"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard" / name))

    # Complete: a rerun computes nothing and reports the same.
    again = run(config, str(workdir))
    assert again["computed"] == [] and again["results"] == results

    # The uninterrupted CLI run (same device count: the environment's 8 fake devices) gives the same numbers.
    fresh = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-m", "eqvae_jax.eval_vae", "--config=configs/eval_vae.py:tiny",
                           f"--workdir={fresh}", f"--config.compilation_cache_dir={cache}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rFID" in proc.stderr and "warning: rFID from 9 images" in proc.stderr
    cli = json.loads((fresh / "results.json").read_text())
    print(json.dumps(cli, indent=1))
    assert cli.keys() == saved.keys()
    for name in cli:
        assert cli[name].keys() == saved[name].keys()
        for key, value in cli[name].items():
            assert value == pytest.approx(saved[name][key], rel=1e-5, abs=1e-6), (name, key)


def test_progress_bar_counts_skipped_images(resumed, tmp_path, capsys):
    """Two photographs and three unreadable files: the bar ends at 5/5 and says 3 were skipped."""
    cache = resumed[2]
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(IMAGES_DIR.glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    for k in range(3):
        (folder / f"bad{k}.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    out = run(_tiny(cache, **{"data.eval_folder": str(folder)}), str(tmp_path / "w"))
    err = capsys.readouterr().err
    assert all(r["images"] == 2 for r in out["results"].values())
    assert "5/5" in err and "skipped=3" in err, err[-2000:]


def test_per_image_numbers_recomputed_outside_the_pipeline(resumed):
    config, workdir, _, _, second = resumed
    c = parse_config(config)
    store = ShardStore(str(workdir), ShardPlan(9, c.effective_shard_size()))
    _, originals = store.read("_originals", 0)
    meta, kl = store.read("kl", 0)
    images = originals["preview_images"]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8

    # The crops are torchvision Resize(32) + CenterCrop(32) of the embedded photographs, in file order.
    photos = sorted(IMAGES_DIR.glob("*.jpg"))
    crops = [resize_center_crop(Image.open(p).convert("RGB"), 32) for p in photos]
    np.testing.assert_array_equal(images, np.stack(crops[:4]))

    # The KL model decodes z = mean + std * eps, eps from fold_in(key(seed), stream position).
    vae = build_autoencoder(c.specs()["kl"])
    x = images.astype(np.float32) / 127.5 - 1.0
    posterior = vae.encode(x)
    eps = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(c.seed), i), posterior.mean.shape[1:])
                    for i in range(4)])
    recon = vae.decode(posterior.mean + posterior.std * eps)
    got = kl["preview_recon"]
    assert np.abs(got.astype(int) - np.asarray(reconstruction.to_uint8(recon)).astype(int)).max() <= 1
    np.testing.assert_allclose(kl["preview_latents"], posterior.mean, rtol=1e-4, atol=1e-5)

    names = meta["metric_names"]
    rows = kl["metrics"][:4]
    np.testing.assert_allclose(rows[:, names.index("psnr")], reconstruction.psnr(recon, x), rtol=1e-3)
    np.testing.assert_allclose(rows[:, names.index("ssim")], reconstruction.ssim(recon, x), rtol=1e-3, atol=1e-5)
    errors = eq_eval.equivariance_errors(lambda a: vae.encode(a).mean, x, c.equivariance)
    for t, value in errors.items():
        np.testing.assert_allclose(rows[:, names.index(f"equivariance/{t}")], value, rtol=1e-3, atol=1e-6)

    # Inception pool features of the originals; TwoNN over every image's flattened posterior mean.
    net = inception.build(inception.tiny(), seed=0)
    np.testing.assert_allclose(originals["pool"][:4], net(images)["pool"], rtol=1e-3, atol=1e-5)
    all_latents = np.concatenate([store.read("kl", s)[1]["latents"] for s in range(2)])
    assert all_latents.shape[0] == 9
    assert second["results"]["kl"]["intrinsic_dimension"] == pytest.approx(
        latents.twonn_dimension(all_latents.reshape(9, -1)))


def test_workdir_of_another_configuration_is_an_error(resumed):
    _, workdir, cache, _, _ = resumed
    with pytest.raises(ShardMismatchError, match=r"seed: 0 -> 1.*new --workdir"):
        run(_tiny(cache, seed=1), str(workdir))


def test_fid_preprocess_option_reaches_the_inception_and_the_report():
    """`fid_preprocess='pytorch_fid'` (zelaki/eqvae's pytorch-fid rFID) builds the Inception with that input
    preprocessing and the results table names it; an unknown value is a config error."""
    c = parse_config(_tiny("", fid_preprocess="pytorch_fid"))
    assert parse_config(_tiny("")).fid_preprocess == "adm"
    net = build_inception(c.inception, c.fid_preprocess)
    assert net.config.preprocess == "pytorch_fid"
    # the shards record the extractor's fingerprint: a workdir of the other preprocessing is another configuration
    assert InceptionExtractor(net).fingerprint != InceptionExtractor(build_inception(c.inception)).fingerprint
    results = {"kl": {"rfid": 1.5, "psnr": 20.0}}
    assert "rFID (pytorch_fid)" in report.format_table(results, c)
    assert "rFID (adm)" in report.format_table(results, parse_config(_tiny("")))
    with pytest.raises(ConfigError, match="fid_preprocess must be one of"):
        parse_config(_tiny("", fid_preprocess="clean_fid"))


def test_config_problems(tmp_path):
    kl_vae.save(kl_vae.build(kl_vae.tiny(base_channels=8, norm_num_groups=4)), tmp_path / "kl")
    config = _tiny("")
    config.models.kl.init = "weights"
    config.models.kl.weights = str(tmp_path / "kl")
    config.models.kl.kind = "vq_vae"
    config.data.image_size = 33
    config.inception = str(tmp_path / "missing")
    config.global_batch_size = 12
    with pytest.raises(ConfigError) as e:
        parse_config(config)
    text = str(e.value)
    for message in ("models.kl", "kl_vae", "data.image_size=33 is not divisible by models.vq's downsampling factor 2",
                    "inception=", "global_batch_size=12 is not a positive multiple of the 8 batch shards"):
        assert message in text, (message, text)
    empty = _tiny("")
    empty.models = {}
    with pytest.raises(ConfigError, match="models is empty"):
        parse_config(empty)


def test_cli_config_error_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eqvae_jax.eval_vae", "--config=configs/eval_vae.py:tiny",
                           f"--workdir={tmp_path}", f"--config.inception={tmp_path / 'nowhere'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "nowhere" in proc.stderr, proc.stderr[-2000:]


def test_tfds_validation_split(resumed, tmp_path):
    """The production data path: a TFDS 'validation' split (the demo set's two held-out photographs as ArrayRecord,
    read as imagenet2012 would be), Resize + CenterCrop, a partial last batch."""
    _, _, cache, _, _ = resumed
    config = _tiny(cache, id_images=0, **{"data.source": "demo", "data.data_dir": str(tmp_path / "tfds"),
                                          "data.eval_split": "validation"})
    out = run(config, str(tmp_path / "run"))
    assert [r["images"] for r in out["results"].values()] == [2, 2]
    assert all(np.isnan(r["intrinsic_dimension"]) for r in out["results"].values())  # id_images=0: skipped
    crops = ShardStore(str(tmp_path / "run"), ShardPlan(2, 8)).read("_originals", 0)[1]["preview_images"]
    want = {p: resize_center_crop(Image.open(IMAGES_DIR / f"{p}.jpg").convert("RGB"), 32) for p in EVAL_PHOTOS}
    assert len(crops) == 2
    for crop in crops:
        assert any(np.array_equal(crop, w) for w in want.values())
    assert not np.array_equal(crops[0], crops[1])
