"""Latent cache: records round-trip, extraction with a tiny random VAE on the demo photographs stores exactly
the VAE's posterior (mean, std) of each image, mirrored by a seeded per-image coin ('random', the default) or in
both orientations ('copy'), and the crop it encoded (mirrored in a flipped record); REPA's `:images` cache never
flips; a restart skips finished chunks, and the training iterator reads the cache (resumably), with or without
images."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import TOY_SHAPE, load_config, write_toy_cache

from eqvae_jax.data import latent_cache
from eqvae_jax.data.decode import decode_image
from eqvae_jax.data.sources import open_source
from eqvae_jax.data.transforms import adm_center_crop
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train.dit.config import LatentsConfig
from eqvae_jax.train.latents import job as latent_extraction
from eqvae_jax.train.latents.config import parse_config
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()


def _config(data_dir: str, **changes):
    # 4 of the 8 fake devices: batches of 4, two chunks of 4 for the 7 demo images
    return load_config("extract_latents", "tiny", **{"data.data_dir": data_dir, "mesh.data": 4,
                                                     "batch_size_per_process": 4, "chunk_size": 4, **changes})


def _records(cache_dir: str) -> list[dict]:
    import grain

    meta = latent_cache.read_meta(cache_dir)
    source = grain.sources.ArrayRecordDataSource(latent_cache.complete_chunk_files(cache_dir, meta))
    images = latent_cache.image_shape(meta)
    return [latent_cache.decode_record(source[i], (8, 8, 4), "float32", images) for i in range(len(source))]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_dir):
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    config = _config(demo_dir)
    stats = latent_extraction.run(config, cache_dir)
    return config, cache_dir, stats


def test_record_round_trip():
    moments = np.random.default_rng(0).standard_normal((4, 4, 8)).astype(np.float32)
    for dtype, tol in (("float32", 0), ("float16", 1e-3), ("bfloat16", 1e-2)):
        data = latent_cache.encode_record(12, 3, True, moments, dtype)
        r = latent_cache.decode_record(data, (4, 4, 4), dtype)
        assert (int(r["index"]), int(r["label"]), bool(r["flipped"])) == (12, 3, True) and "image" not in r
        np.testing.assert_allclose(r["mean"], moments[..., :4], atol=tol * 4)
        np.testing.assert_allclose(r["std"], moments[..., 4:], atol=tol * 4)
    image = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    data = latent_cache.encode_record(1, 2, False, moments, "bfloat16", image[:, ::-1])
    r = latent_cache.decode_record(data, (4, 4, 4), "bfloat16", (6, 6, 3))
    np.testing.assert_array_equal(r["image"], image[:, ::-1])
    np.testing.assert_allclose(r["mean"], moments[..., :4], atol=4e-2)
    with pytest.raises(ValueError, match="expected"):  # a cache read with the wrong layout is an error
        latent_cache.decode_record(data, (4, 4, 4), "bfloat16")
    with pytest.raises(ValueError, match="uint8"):
        latent_cache.encode_record(1, 2, False, moments, "float32", image.astype(np.float32))


def test_flip_draws_are_a_seeded_fair_coin_per_image():
    draws = latent_cache.flip_draws(0, np.arange(100_000))
    assert abs(draws.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(latent_cache.flip_draws(0, np.arange(40, 60)), draws[40:60])  # any batching
    assert not np.array_equal(latent_cache.flip_draws(1, np.arange(1000)), draws[:1000])  # the seed matters
    assert latent_cache.flip_draws(0, np.arange(7)).tolist() == [True, False, True, True, False, False, True]


def test_extraction_stores_the_vae_posterior(cache, demo_dir):
    config, cache_dir, stats = cache
    meta = latent_cache.read_meta(cache_dir)
    assert stats["chunks_written"] == meta["num_chunks"] == 2 and stats["images"] == meta["num_images"] == 7
    assert stats["records"] == 7 and (meta["flip"], meta["flip_seed"]) == ("random", 0)
    assert meta["latent_shape"] == [8, 8, 4] and meta["scaling_factor"] == pytest.approx(0.18215)
    assert meta["store_images"] and latent_cache.image_shape(meta) == (64, 64, 3)
    records = _records(cache_dir)
    assert sorted(int(r["index"]) for r in records) == list(range(7))  # one record per image
    flips = latent_cache.flip_draws(0, np.arange(7))
    assert all(bool(r["flipped"]) == flips[int(r["index"])] for r in records)
    # recompute a mirrored (0) and an unmirrored (5) image directly with the same VAE
    images = open_source(config.data, train=True)
    vae = build_autoencoder(parse_config(config).vae)
    for index in (0, 5):
        rec = images[index]
        crop = adm_center_crop(decode_image(rec["bytes"]), 64)
        x = (jnp.asarray(crop, jnp.float32)[None] - 127.5) / 127.5
        post = vae.encode(x[:, :, ::-1] if flips[index] else x)
        r = next(r for r in records if int(r["index"]) == index)
        assert int(r["label"]) == rec["label"]
        # the stored crop is the one encoded above, mirrored for a flipped record
        np.testing.assert_array_equal(r["image"], crop[:, ::-1] if flips[index] else crop)
        np.testing.assert_allclose(r["mean"], np.asarray(post.mean[0]), atol=1e-5)
        np.testing.assert_allclose(r["std"], np.asarray(post.std[0]), atol=1e-5)


def test_copy_stores_both_orientations(cache, tmp_path):
    config, random_dir, _ = cache
    stats = latent_extraction.run(_config(config.data.data_dir, flip="copy"), str(tmp_path))
    assert stats["images"] == 7 and stats["records"] == 14
    records = _records(str(tmp_path))
    assert sorted((int(r["index"]), bool(r["flipped"])) for r in records) == [(i, f) for i in range(7)
                                                                                 for f in (False, True)]
    copies = {(int(r["index"]), bool(r["flipped"])): r for r in records}
    for r in _records(random_dir):  # the 'random' record is the copy of the orientation its coin chose
        np.testing.assert_allclose(r["mean"], copies[int(r["index"]), bool(r["flipped"])]["mean"], atol=1e-6)


def test_repa_images_variant_stores_unflipped_center_crops(cache, tmp_path):
    """configs/extract_latents.py:images (REPA's cache) never mirrors: every record holds the plain ADM center crop
    and the posterior of that crop, also for the images the default's coin mirrors."""
    config, random_dir, _ = cache
    repa = load_config("extract_latents", "images,tiny", **{"data.data_dir": config.data.data_dir, "mesh.data": 4,
                                                            "batch_size_per_process": 4, "chunk_size": 4})
    assert parse_config(repa).flip == "none" and load_config("extract_latents").flip == "random"  # DiT keeps it
    stats = latent_extraction.run(repa, str(tmp_path))
    assert stats["records"] == 7 and latent_cache.read_meta(str(tmp_path))["flip"] == "none"
    records = {int(r["index"]): r for r in _records(str(tmp_path))}
    mirrored = {int(r["index"]): r for r in _records(random_dir) if r["flipped"]}
    assert sorted(records) == list(range(7)) and not any(bool(r["flipped"]) for r in records.values())
    assert len(mirrored) == 4  # the default cache mirrors images 0, 2, 3, 6
    images = open_source(repa.data, train=True)
    for index, r in records.items():
        crop = adm_center_crop(decode_image(images[index]["bytes"]), 64)
        np.testing.assert_array_equal(r["image"], crop)
        if index in mirrored:  # same VAE and crop, other orientation: the default stored the mirror image
            np.testing.assert_array_equal(mirrored[index]["image"], crop[:, ::-1])
            assert np.abs(r["mean"] - mirrored[index]["mean"]).max() > 1e-3
    vae = build_autoencoder(parse_config(repa).vae)
    x = (jnp.asarray(adm_center_crop(decode_image(images[0]["bytes"]), 64), jnp.float32)[None] - 127.5) / 127.5
    np.testing.assert_allclose(records[0]["mean"], np.asarray(vae.encode(x).mean[0]), atol=1e-5)


def test_restart_skips_finished_chunks(cache, tmp_path):
    config, cache_dir, _ = cache
    meta = latent_cache.read_meta(cache_dir)
    paths = latent_cache.complete_chunk_files(cache_dir, meta)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    again = latent_extraction.run(config, cache_dir)
    assert again["chunks_written"] == 0 and again["chunks_skipped"] == 2
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes

    # an interrupted run: only the missing chunk is encoded, identically
    copy = tmp_path / "copy"
    os.makedirs(copy / latent_cache.CHUNKS_DIR)
    for name in (latent_cache.META_FILE, os.path.join(latent_cache.CHUNKS_DIR, os.path.basename(paths[0]))):
        with open(os.path.join(cache_dir, name), "rb") as src, open(copy / name, "wb") as dst:
            dst.write(src.read())
    resumed = latent_extraction.run(config, str(copy))
    assert resumed["chunks_written"] == 1 and resumed["chunks_skipped"] == 1 and resumed["images"] == 3
    with open(paths[1], "rb") as a, open(latent_cache.chunk_path(str(copy), 1, 2), "rb") as b:
        assert a.read() == b.read()

    for key, value in (("flip", "copy"), ("flip_seed", 1), ("store_images", False)):
        changed = _config(config.data.data_dir, **{key: value})
        with pytest.raises(ValueError, match=rf"made differently \(\['{key}'\] differ"):
            latent_extraction.run(changed, cache_dir)


def test_iterator_reads_cache_and_resumes(cache):
    _, cache_dir, _ = cache
    lat = LatentsConfig(cache_dir=cache_dir)
    mesh = make_mesh(1, -1)
    it, meta = latent_cache.build_latent_iterator(lat, mesh, 8)
    first = next(it)
    assert first["mean"].shape == (8, 8, 8, 4) and first["label"].dtype == jnp.int32
    assert first["image"].shape == (8, 64, 64, 3) and first["image"].dtype == jnp.uint8
    assert bool(jnp.all(first["std"] > 0)) and first["mean"].sharding.spec == jax.sharding.PartitionSpec(
        ("data", "fsdp"))
    state = it.get_state()
    expected = [jax.device_get(next(it)) for _ in range(3)]  # crosses the 14-record epoch boundary
    it.close()
    again, _ = latent_cache.build_latent_iterator(lat, mesh, 8)
    again.set_state(state)
    for want in expected:
        got = jax.device_get(next(again))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    again.close()


def test_config_validation_names_problems():
    config = _config("")
    config.chunk_size = 6
    with pytest.raises(ConfigError, match="multiple of batch_size_per_process"):
        parse_config(config)
    config = _config("")
    config.flip_sed = 1
    config.flip = "both"
    config.vae.init = "weights"
    config.vae.weights = ""
    with pytest.raises(ConfigError, match=r"(?s)did you mean 'flip_seed'.*vae.weights is empty.*flip must be one of"):
        parse_config(config)


def test_incomplete_cache_is_an_error(tmp_path):
    latent_cache.write_meta(str(tmp_path), {"num_chunks": 2, "latent_shape": [2, 2, 1], "dtype": "float32"})
    rec = latent_cache.encode_record(0, 0, False, np.zeros((2, 2, 2), np.float32), "float32")
    latent_cache.write_chunk(latent_cache.chunk_path(str(tmp_path), 0, 2), [rec])
    with pytest.raises(FileNotFoundError, match="1 of 2 chunks missing"):
        latent_cache.complete_chunk_files(str(tmp_path), latent_cache.read_meta(str(tmp_path)))


def test_cache_without_images_still_reads(tmp_path):
    """A cache whose meta predates `store_images` (the toy cache writes none) yields batches without 'image'."""
    write_toy_cache(str(tmp_path))
    meta = latent_cache.read_meta(str(tmp_path))
    assert "store_images" not in meta and latent_cache.image_shape(meta) is None
    it, _ = latent_cache.build_latent_iterator(LatentsConfig(cache_dir=str(tmp_path)), make_mesh(1, -1), 8)
    batch = next(it)
    it.close()
    assert sorted(batch) == ["label", "mean", "std"] and batch["mean"].shape == (8, *TOY_SHAPE)
