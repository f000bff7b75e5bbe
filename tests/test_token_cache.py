"""Token cache (the latent cache's machinery with content 'tokens'): extraction with a tiny random VQ on the demo
photographs stores exactly `vq.encode(crop).indices` of every seeded random crop and of its mirror, a restart
skips finished chunks, the reader shows one stored augmentation per image and epoch (seeded) and resumes exactly,
and bad configs or a cache of the other content are clear errors."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import load_config

from eqvae_jax.data import latent_cache
from eqvae_jax.data.decode import decode_image
from eqvae_jax.data.latent_cache import LatentReadConfig
from eqvae_jax.data.sources import open_source
from eqvae_jax.data.transforms import Crop
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train.latents import job as extraction
from eqvae_jax.train.latents.config import parse_config
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()
GRID = (16, 16)


def _config(data_dir: str, **changes):
    # 4 of the 8 fake devices: batches of 4, two chunks of 4 for the 7 demo images; 2 crops x 2 flips per image
    return load_config("extract_tokens", "tiny", **{"data.data_dir": data_dir, "mesh.data": 4,
                                                    "batch_size_per_process": 4, "chunk_size": 4, **changes})


def _records(cache_dir: str) -> list[dict]:
    meta = latent_cache.read_meta(cache_dir)
    source = grain.sources.ArrayRecordDataSource(latent_cache.complete_chunk_files(cache_dir, meta))
    shape = latent_cache.image_shape(meta)
    return [latent_cache.decode_token_record(source[i], GRID, shape) for i in range(len(source))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("tokens"))
    config = _config(str(tmp_path_factory.mktemp("tfds")))
    return config, cache_dir, extraction.run(config, cache_dir)


def test_token_record_round_trip():
    tokens = np.random.default_rng(0).integers(0, 1024, GRID)
    image = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    data = latent_cache.encode_token_record(9, 7, True, 3, tokens, image)
    r = latent_cache.decode_token_record(data, GRID, (4, 4, 3))
    assert (int(r["index"]), int(r["label"]), bool(r["flipped"]), int(r["crop"])) == (9, 7, True, 3)
    assert r["tokens"].dtype == np.int32
    np.testing.assert_array_equal(r["tokens"], tokens)
    np.testing.assert_array_equal(r["image"], image)
    data = latent_cache.encode_token_record(0, 0, False, 0, tokens)
    assert len(data) == 527  # 15 B header + 256 int16 codes
    with pytest.raises(ValueError, match="expected"):
        latent_cache.decode_token_record(data, (8, 8))
    with pytest.raises(ValueError, match="do not fit int16"):
        latent_cache.encode_token_record(0, 0, False, 0, np.full(GRID, 40_000))


def test_extraction_stores_the_vq_indices_of_each_crop_and_its_mirror(cache):
    config, cache_dir, stats = cache
    meta = latent_cache.read_meta(cache_dir)
    assert stats["chunks_written"] == meta["num_chunks"] == 2 and stats["images"] == 7 and stats["records"] == 28
    assert meta["content"] == "tokens" and meta["token_shape"] == list(GRID) and meta["codebook_size"] == 64
    assert meta["records_per_image"] == latent_cache.records_per_image(meta) == 4
    records = _records(cache_dir)
    # an image's records are consecutive: crop 0 as is, mirrored, crop 1 as is, mirrored
    keys = [(int(r["index"]), int(r["crop"]), bool(r["flipped"])) for r in records]
    assert keys == [(i, c, f) for i in range(7) for c in (0, 1) for f in (False, True)]
    parsed = parse_config(config)
    vq = build_autoencoder(parsed.vae)
    images = open_source(parsed.data, train=True)
    crop = Crop("resize_random_crop", 32)
    differ = 0
    for i in range(7):
        source = decode_image(images[i]["bytes"])
        crops = [crop(source, latent_cache.crop_rng(0, i, c)) for c in (0, 1)]  # recomputed independently
        differ += not np.array_equal(crops[0], crops[1])
        for c in (0, 1):
            x = (jnp.asarray(crops[c], jnp.float32)[None] - 127.5) / 127.5
            for flipped, want in ((False, vq.encode(x).indices[0]), (True, vq.encode(x[:, :, ::-1]).indices[0])):
                r = records[keys.index((i, c, flipped))]
                assert int(r["label"]) == images[i]["label"]
                np.testing.assert_array_equal(r["image"], crops[c][:, ::-1] if flipped else crops[c])
                np.testing.assert_array_equal(r["tokens"], np.asarray(want))
    assert differ >= 3  # the non-square photographs get different windows per crop
    by_key = dict(zip(keys, records, strict=True))  # mirroring the tokens is not encoding the mirrored crop
    assert any(not np.array_equal(by_key[i, 0, True]["tokens"], by_key[i, 0, False]["tokens"][:, ::-1])
               for i in range(7))


def test_random_flip_with_crops_is_one_seeded_coin_per_crop(cache, tmp_path):
    config, _, _ = cache
    stats = extraction.run(_config(config.data.data_dir, flip="random", **{"store_images": False}), str(tmp_path))
    assert stats["records"] == 14
    records = _records(str(tmp_path))
    index = np.asarray([int(r["index"]) for r in records])
    crop = np.asarray([int(r["crop"]) for r in records])
    np.testing.assert_array_equal(index, np.repeat(np.arange(7), 2))
    np.testing.assert_array_equal([bool(r["flipped"]) for r in records], latent_cache.flip_draws(0, index, crop))
    np.testing.assert_array_equal(latent_cache.flip_draws(0, np.arange(7), 0), latent_cache.flip_draws(0, np.arange(7)))


def test_restart_skips_finished_chunks(cache, tmp_path):
    config, cache_dir, _ = cache
    paths = latent_cache.complete_chunk_files(cache_dir, latent_cache.read_meta(cache_dir))
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    again = extraction.run(config, cache_dir)
    assert again["chunks_written"] == 0 and again["chunks_skipped"] == 2
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes

    copy = tmp_path / "copy"  # an interrupted run: only the missing chunk is encoded, byte for byte the same
    os.makedirs(copy / latent_cache.CHUNKS_DIR)
    for name in (latent_cache.META_FILE, os.path.join(latent_cache.CHUNKS_DIR, os.path.basename(paths[0]))):
        with open(os.path.join(cache_dir, name), "rb") as src, open(copy / name, "wb") as dst:
            dst.write(src.read())
    resumed = extraction.run(config, str(copy))
    assert resumed["chunks_written"] == 1 and resumed["images"] == 3
    with open(paths[1], "rb") as a, open(latent_cache.chunk_path(str(copy), 1, 2), "rb") as b:
        assert a.read() == b.read()
    with pytest.raises(ValueError, match=r"made differently \(\['crops'\] differ"):
        extraction.run(_config(config.data.data_dir, crops=3), cache_dir)


def _groups(cache_dir: str) -> dict[int, tuple[int, list[np.ndarray]]]:
    """label -> (group number, the tokens of its 4 stored variants); the demo's labels are one per photograph."""
    records = _records(cache_dir)
    return {int(records[4 * g]["label"]): (g, [r["tokens"] for r in records[4 * g: 4 * g + 4]]) for g in range(7)}


def test_reader_picks_one_seeded_variant_per_image_and_epoch(cache):
    _, cache_dir, _ = cache
    groups = _groups(cache_dir)
    read = LatentReadConfig(cache_dir=cache_dir, seed=3)
    it, meta = latent_cache.build_token_iterator(read, make_mesh(1, -1), 8)
    batches = [jax.device_get(next(it)) for _ in range(7)]  # 56 elements: 8 epochs of the 7 images
    it.close()
    assert batches[0]["tokens"].shape == (8, 16, 16) and batches[0]["tokens"].dtype == np.int32
    tokens = np.concatenate([b["tokens"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    seen = {label: set() for label in groups}
    for p, (t, label) in enumerate(zip(tokens, labels, strict=True)):
        epoch, (g, variants) = p // 7, groups[int(label)]
        v = int(latent_cache.variant_draws(3, epoch, np.asarray(g), 4))
        np.testing.assert_array_equal(t, variants[v])
        seen[int(label)].add(v)
    for e in range(8):  # every image once per epoch
        assert sorted(labels[7 * e: 7 * e + 7].tolist()) == sorted(groups)
    assert all(len(v) >= 2 for v in seen.values())  # over 8 epochs an image shows several of its variants


def test_reader_resumes_exactly(cache):
    _, cache_dir, _ = cache
    read = LatentReadConfig(cache_dir=cache_dir)
    mesh = make_mesh(1, -1)
    it, _ = latent_cache.build_token_iterator(read, mesh, 8)
    next(it)
    state = it.get_state()
    expected = [jax.device_get(next(it)) for _ in range(3)]  # crosses epoch boundaries
    it.close()
    again, _ = latent_cache.build_token_iterator(read, mesh, 8)
    again.set_state(state)
    for want in expected:
        got = jax.device_get(next(again))
        assert sorted(got) == ["label", "tokens"]
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    again.close()


def test_bad_configs_and_the_wrong_cache(cache):
    _, cache_dir, _ = cache
    config = _config("")
    config.vae.kind = "kl_vae"
    config.data.transform = "resize_center_crop"
    with pytest.raises(ConfigError, match=r"(?s)needs a VQ autoencoder.*would store identical copies"):
        parse_config(config)
    latents = load_config("extract_latents", "tiny", crops=2, **{"data.transform": "eqvae_train_crop"})
    with pytest.raises(ConfigError, match="several crops per image are for token caches"):
        parse_config(latents)
    with pytest.raises(ValueError, match="holds tokens, not moments"):
        latent_cache.build_latent_iterator(LatentReadConfig(cache_dir=cache_dir), make_mesh(1, -1), 8)
