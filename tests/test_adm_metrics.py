"""ADM statistics: eqvae_jax.eval.adm_metrics against the numpy transcription of guided-diffusion's evaluator.py
(tests/torch_refs/adm_evaluator_ref.py), the fp16 -> fp32 distance rule, IS splits, FID fallbacks, npz I/O."""

import warnings
import zipfile

import adm_evaluator_ref as ref_impl
import numpy as np
import pytest

from eqvae_jax.eval import adm_metrics as adm


def _features(seed: int, n: int, shift: float, dims=(64, 48), classes: int = 50, w=None):
    g = np.random.default_rng(seed)
    pool = np.abs(g.normal(shift, 1.0, (n, dims[0]))).astype(np.float32)  # non-negative like pool_3
    spatial = np.abs(g.normal(shift, 1.5, (n, dims[1]))).astype(np.float32)
    w = w if w is not None else g.normal(0, 0.5, (dims[0], classes)).astype(np.float32)
    logits = np.matmul(pool, w).astype(np.float32)
    return adm.Activations(pool, spatial, logits), w


def _compare(got: dict, want: dict, label: str) -> None:
    print(f"{label}: " + ", ".join(f"{k} ours {got[k]:.10g} ADM {want[k]:.10g}" for k in want))
    for key in ("fid", "sfid", "inception_score"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key
    assert got["precision"] == want["precision"] and got["recall"] == want["recall"]


@pytest.mark.parametrize("blocks", [None, 70], ids=["adm_blocks", "blocks70"])
def test_five_numbers_match_adm_transcription(blocks):
    ref, w = _features(0, 300, 0.0)
    sample, _ = _features(1, 260, 0.3, w=w)
    kw = {} if blocks is None else {"row_batch_size": blocks, "col_batch_size": blocks}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adm.EvaluationWarning)
        got = adm.evaluate(ref, sample, **kw)
    want = ref_impl.evaluate(ref.pool, ref.spatial, sample.pool, sample.spatial, sample.pool, w, **kw)
    _compare(got, want, f"ADM cross-check ({blocks or 10000}-row blocks)")
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_precomputed_reference_statistics_are_used():
    ref, w = _features(2, 120, 0.0)
    sample, _ = _features(3, 110, 0.2, w=w)
    other, _ = _features(4, 500, 0.5, w=w)  # the statistics differ from ref's own features
    stats = other.statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adm.EvaluationWarning)
        got = adm.evaluate(ref, sample, ref_stats=stats)
        plain = adm.evaluate(ref, sample)
    want = ref_impl.evaluate(ref.pool, ref.spatial, sample.pool, sample.spatial, sample.pool, w,
                             ref_stats=(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma))
    _compare(got, want, "ADM cross-check (reference statistics from the npz)")
    assert got["fid"] != pytest.approx(plain["fid"]) and got["precision"] == plain["precision"]


def test_fp16_block_falls_back_to_fp32_per_block():
    g = np.random.default_rng(5)
    u = g.normal(0, 1, (30, 16)).astype(np.float32)
    v = g.normal(0, 1, (20, 16)).astype(np.float32)
    small = adm.pairwise_distances(u, v)
    assert np.array_equal(small, small.astype(np.float16).astype(np.float32))  # float16 values
    exact = ((u[:, None] - v[None]) ** 2).sum(-1)
    assert np.allclose(small, exact, rtol=2e-3, atol=2e-2)
    big = u.copy()
    big[3] *= 200.0  # |u|^2 > 65504: that float16 block is not finite
    d = adm.pairwise_distances(big, v)
    with np.errstate(over="ignore"):
        assert not np.array_equal(d, d.astype(np.float16).astype(np.float32))  # the whole block is float32
    np.testing.assert_allclose(d, ((big[:, None] - v[None]) ** 2).sum(-1), rtol=1e-4)
    np.testing.assert_array_equal(d, ref_impl.DistanceBlock().pairwise_distances(big, v))
    # 2 u.v overflows float16 while the norms do not: ADM's graph clamps the -inf to 0 and keeps float16
    same = np.full((2, 4), 110.0, np.float32)  # |u|^2 = 48400 < 65504, 2 u.v = 96800 = inf in float16
    assert np.array_equal(adm.pairwise_distances(same, same), np.zeros((2, 2), np.float32))


def test_precision_recall_with_mixed_fp16_fp32_blocks():
    ref, _ = _features(6, 90, 0.0, dims=(16, 4))
    sample, _ = _features(7, 80, 0.1, dims=(16, 4))
    sample.pool[:7] *= 100.0  # the blocks holding these rows use float32, the others float16
    kw = {"row_batch_size": 25, "col_batch_size": 30}
    got = adm.precision_recall(ref.pool, sample.pool, **kw)
    want = ref_impl.compute_prec_recall(ref.pool, sample.pool, **kw)
    print(f"P/R with mixed blocks: ours {got}, ADM {want}")
    assert got == want
    r = adm.manifold_radii(sample.pool, row_batch_size=25, col_batch_size=30)
    np.testing.assert_array_equal(r, ref_impl.ManifoldEstimator(25, 30).manifold_radii(sample.pool)[:, 0])


def test_precision_recall_semantics_and_order():
    g = np.random.default_rng(8)
    ref = g.normal(0, 1, (200, 8)).astype(np.float32)
    ref[100:] += 50.0  # two modes
    inside = ref[:60] + g.normal(0, 0.01, (60, 8)).astype(np.float32)  # samples of the first mode only
    p, r = adm.precision_recall(ref, inside)
    assert p == 1.0 and 0.2 < r <= 0.5  # every sample is realistic; the samples miss the second mode
    rp, rr = adm.precision_recall(inside, ref)  # swapped roles: precision <-> recall
    assert (rp, rr) == (r, p)
    far = ref + 100.0
    assert adm.precision_recall(ref, far) == (0.0, 0.0)


def test_inception_score_splits():
    g = np.random.default_rng(9)
    w = g.normal(0, 1, (8, 10)).astype(np.float32)
    pool = np.abs(g.normal(0, 2, (12001, 8))).astype(np.float32)  # splits 5000, 5000, 2000, 1
    got = adm.inception_score(np.matmul(pool, w))
    want = ref_impl.compute_inception_score(pool, w)
    print(f"IS over 3 full/partial splits + 1 image: ours {got:.10g}, ADM {want:.10g}")
    assert got == pytest.approx(want, rel=1e-6)
    assert adm.inception_score(np.zeros((7, 10))) == pytest.approx(1.0)  # uniform predictions
    confident = np.full((10, 10), -50.0)
    np.fill_diagonal(confident, 50.0)  # ten confident, distinct predictions: IS = 10
    assert adm.inception_score(confident) == pytest.approx(10.0, rel=1e-5)
    assert adm.inception_score(confident[:3], split_size=2) == pytest.approx((2 + 1) / 2, rel=1e-5)


def test_frechet_distance_known_values_and_fallbacks(monkeypatch):
    a = adm.Statistics(np.array([1.0, 2.0]), np.diag([4.0, 9.0]))
    b = adm.Statistics(np.array([0.0, 0.0]), np.diag([1.0, 1.0]))
    # diagonal case: |mu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    assert adm.frechet_distance(a, b) == pytest.approx(5 + (2 - 1) ** 2 + (3 - 1) ** 2)
    assert adm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(adm.BadInputError, match="different dimensions"):
        adm.frechet_distance(a, adm.Statistics(np.zeros(3), np.eye(3)))
    real_sqrtm = adm.linalg.sqrtm
    calls = []

    def flaky(m):  # the first attempt is not finite, as for a numerically singular product
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(adm.linalg, "sqrtm", flaky)
    with pytest.warns(adm.EvaluationWarning, match="adding 1e-06"):
        value = adm.frechet_distance(a, b)
    np.testing.assert_allclose(calls[1], (a.sigma + 1e-6 * np.eye(2)) @ (b.sigma + 1e-6 * np.eye(2)))
    assert value == pytest.approx(10.0, abs=1e-5)
    monkeypatch.setattr(adm.linalg, "sqrtm", lambda m: real_sqrtm(m) + 0.5j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary component"):
        adm.frechet_distance(a, b)
    monkeypatch.setattr(adm.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1e-5j * np.eye(len(m)))
    assert adm.frechet_distance(a, b) == pytest.approx(10.0)


def test_small_batches_warn_and_bad_ones_fail():
    ref, w = _features(10, 40, 0.0, dims=(6, 5), classes=4)
    sample, _ = _features(11, 3, 0.0, dims=(6, 5), classes=4, w=w)
    with pytest.warns(adm.EvaluationWarning) as record:
        out = adm.evaluate(ref, sample)
    text = " ".join(str(r.message) for r in record)
    assert "biased" in text and "more than k=3" in text
    assert np.isnan(out["precision"]) and np.isnan(out["recall"]) and np.isfinite(out["inception_score"])
    bad, _ = _features(12, 10, 0.0, dims=(7, 5), classes=4)
    with pytest.raises(adm.BadInputError, match="pool features: reference has 6 dimensions, samples 7"):
        adm.evaluate(ref, bad)
    empty = adm.Activations(np.zeros((0, 6), np.float32), np.zeros((0, 5), np.float32), np.zeros((0, 4)))
    with pytest.raises(adm.BadInputError, match="empty"):
        adm.evaluate(ref, empty)


# ---- npz batches ---------------------------------------------------------------------------------------------


def test_npz_images_stream_and_validate(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    for name, save in (("plain.npz", np.savez), ("compressed.npz", np.savez_compressed)):
        save(tmp_path / name, arr_0=images, labels=np.arange(11))
        batches = list(adm.NpzImages(tmp_path / name).batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), images)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images))
    np.testing.assert_array_equal(np.concatenate(list(adm.NpzImages(tmp_path / "fortran.npz").batches(5))), images)
    cases = {
        "noarr.npz": ({"images": images}, "no 'arr_0' image array.*holds images"),
        "float.npz": ({"arr_0": images.astype(np.float32)}, "float32; ADM batches are uint8"),
        "nchw.npz": ({"arr_0": images.transpose(0, 3, 1, 2)}, r"shape \(11, 3, 5, 6\); expected \(N, H, W, 3\)"),
        "empty.npz": ({"arr_0": images[:0]}, "empty"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(adm.BadInputError, match=message):
            adm.NpzImages(tmp_path / name)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(adm.BadInputError, match="not an .npz"):
        adm.NpzImages(tmp_path / "junk.npz")
    with pytest.raises(adm.BadInputError, match="no such file"):
        adm.NpzImages(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(tmp_path / "plain.npz")


def test_reference_batch_roundtrip(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    acts, _ = _features(13, 30, 0.0)
    stats = acts.statistics()
    adm.write_batch(tmp_path / "ref.npz", images, stats)
    with np.load(tmp_path / "ref.npz") as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    back = adm.read_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(back[0].sigma, stats[0].sigma)
    np.testing.assert_array_equal(back[1].mu, stats[1].mu)
    assert adm.read_statistics(tmp_path / "ref.npz") is not None
    adm.write_batch(tmp_path / "plain.npz", images)
    assert adm.read_statistics(tmp_path / "plain.npz") is None
    np.savez(tmp_path / "partial.npz", arr_0=images, mu=stats[0].mu, sigma=stats[0].sigma)
    with pytest.raises(adm.BadInputError, match="not mu_s, sigma_s"):
        adm.read_statistics(tmp_path / "partial.npz")
    np.savez(tmp_path / "badsigma.npz", arr_0=images, mu=stats[0].mu, sigma=stats[0].sigma[:3],
             mu_s=stats[1].mu, sigma_s=stats[1].sigma)
    with pytest.raises(adm.BadInputError, match="mu/sigma"):
        adm.read_statistics(tmp_path / "badsigma.npz")
    with pytest.raises(adm.BadInputError, match="uint8"):
        adm.write_batch(tmp_path / "x.npz", images.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badsigma.npz", "partial.npz", "plain.npz", "ref.npz"]
