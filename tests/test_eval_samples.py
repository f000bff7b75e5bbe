"""`python -m eqvae_jax.eval_samples` on two small synthetic batches with a tiny random Inception (build + save):
the five numbers equal the numpy ADM transcription's, the sample/reference order, sharded extraction with a
padded last batch, the feature cache, --write_ref, and bad input (exit 2, one line)."""

import json
import os
import socket
import subprocess
import sys

import adm_evaluator_ref as ref_impl
import jax
import numpy as np
import pytest
from cpu_devices import xla_flags

from eqvae_jax import eval_samples
from eqvae_jax.eval import features as features_mod
from eqvae_jax.eval import inception
from eqvae_jax.models.weights import assign_variables, flat_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed: int, n: int, bright: float) -> np.ndarray:
    """Smooth random images (upsampled noise) so the features vary but are not pure noise."""
    g = np.random.default_rng(seed)
    low = g.uniform(0, 255 * bright, (n, 6, 6, 3))
    img = np.repeat(np.repeat(low, 5, axis=1), 5, axis=2)[:, :28, :28]
    return np.clip(img + g.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    net = inception.build(inception.tiny(), seed=4)
    flat = flat_variables(net)
    flat["fc/kernel"] = flat["fc/kernel"] * 30.0  # the tiny net's pool features are small: sharpen the softmax
    assign_variables(net, flat)
    inception.save(net, d / "inception")
    samples, ref = _images(0, 37, 0.8), _images(1, 45, 1.0)
    np.savez(d / "samples.npz", arr_0=samples, labels=np.arange(37))
    np.savez(d / "ref.npz", arr_0=ref)
    feats = {name: {k: np.asarray(v) for k, v in net(x).items()} for name, x in (("samples", samples), ("ref", ref))}
    w = flat_variables(net)["fc/kernel"]
    return d, net, feats, w


def _run(d, *extra, samples="samples.npz", ref="ref.npz", out="out.json"):
    argv = ["--samples", str(d / samples), "--ref", str(d / ref), "--inception", str(d / "inception"),
            "--out", str(d / out), "--batch_size", "16", "--quiet", *extra]
    code = eval_samples.main(argv)
    return code, (json.loads((d / out).read_text()) if code == 0 else None)


def _transcription(feats, sample: str, ref: str, w) -> dict:
    s, r = feats[sample], feats[ref]
    return ref_impl.evaluate(r["pool"], r["spatial"], s["pool"], s["spatial"], s["pool"], w)


def test_cli_matches_adm_transcription_and_order(setup, capsys):
    d, _, feats, w = setup
    code, got = _run(d)
    assert code == 0
    assert set(got) == {"fid", "sfid", "inception_score", "precision", "recall"}
    captured = capsys.readouterr()
    assert "FID" in captured.out and "Inception Score" in captured.out and "biased" in captured.err
    want = _transcription(feats, "samples", "ref", w)
    print(f"CLI vs ADM transcription: ours {got}\n  ADM {want}")
    for key in ("fid", "sfid", "inception_score"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["precision"] == want["precision"] and got["recall"] == want["recall"]
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1

    # The EQ-VAE reference script passed (samples, ref) in ADM's (ref, sample) slots: IS of the wrong batch,
    # precision and recall exchanged. Ours follows the flags.
    code, swapped = _run(d, samples="ref.npz", ref="samples.npz", out="swapped.json")
    assert code == 0
    want_swapped = _transcription(feats, "ref", "samples", w)
    assert swapped["inception_score"] == pytest.approx(want_swapped["inception_score"], rel=1e-5)
    assert swapped["inception_score"] != pytest.approx(got["inception_score"], rel=1e-3)
    assert (swapped["precision"], swapped["recall"]) == (got["recall"], got["precision"])
    assert swapped["fid"] == pytest.approx(got["fid"], rel=1e-4)  # FID is symmetric


def test_sharded_extraction_and_cache(setup, monkeypatch, tmp_path):
    d, net, feats, _ = setup
    extractor = features_mod.InceptionExtractor(net, batch_size=16)  # 8 devices x 2; 37 = 16 + 16 + 5 (padded)
    assert extractor.mesh.size == jax.device_count() == 8
    acts = extractor.from_npz(d / "samples.npz", cache_dir=str(tmp_path), progress=False)
    for key in features_mod.KEYS:
        want = feats["samples"][key]
        assert getattr(acts, key).shape == want.shape
        assert np.max(np.abs(getattr(acts, key) - want)) <= 1e-5 * np.max(np.abs(want)), key
    on_device = extractor.on_device(jax.device_put(_images(0, 37, 0.8)[:32]))
    assert on_device["pool"].sharding.is_equivalent_to(extractor._sharding, 2)
    np.testing.assert_allclose(np.asarray(on_device["spatial"]), acts.spatial[:32], rtol=1e-5, atol=1e-5)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached == [f"samples.inception-{extractor.fingerprint[:16]}.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite a current cache")

    monkeypatch.setattr(extractor, "_fn", fail)
    again = extractor.from_npz(d / "samples.npz", cache_dir=str(tmp_path), progress=False)
    np.testing.assert_array_equal(again.pool, acts.pool)
    other = features_mod.InceptionExtractor(inception.build(inception.tiny(), seed=5), batch_size=8)
    assert other.cache_path(d / "samples.npz", str(tmp_path)) != extractor.cache_path(d / "samples.npz",
                                                                                       str(tmp_path))
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        features_mod.InceptionExtractor(net, batch_size=12)


def test_write_ref_then_use_its_statistics(setup):
    d, _, feats, w = setup
    code, first = _run(d, "--write_ref", str(d / "ref_stats.npz"), "--no_cache", out="a.json")
    assert code == 0
    with np.load(d / "ref_stats.npz") as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert data["mu"].shape == (128,) and data["sigma_s"].shape == (63, 63)
    code, second = _run(d, ref="ref_stats.npz", out="b.json")
    assert code == 0
    for key in first:
        assert second[key] == pytest.approx(first[key], rel=1e-6), key
    assert eval_samples.main(["--ref", str(d / "ref.npz"), "--inception", str(d / "inception"), "--quiet",
                              "--batch_size", "16", "--write_ref", str(d / "only.npz")]) == 0
    assert (d / "only.npz").exists()


def _write_bad(d, name, **arrays):
    np.savez(d / name, **arrays)
    return name


def test_bad_inputs_exit_2_with_one_line(setup, capsys):
    d, _, _, _ = setup
    images = _images(2, 6, 1.0)
    mu, sigma = np.zeros(2048, np.float32), np.eye(2048, dtype=np.float32)
    cases = {
        _write_bad(d, "noarr.npz", images=images): "no 'arr_0'",
        _write_bad(d, "float.npz", arr_0=images.astype(np.float32)): "uint8",
        _write_bad(d, "nchw.npz", arr_0=images.transpose(0, 3, 1, 2)): "(N, H, W, 3)",
        _write_bad(d, "empty.npz", arr_0=images[:0]): "empty",
        _write_bad(d, "dims.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2023], sigma_s=sigma[:2023, :2023]):
            "2048/2023-dimensional",
        "missing.npz": "no such file",
    }
    for name, message in cases.items():
        capsys.readouterr()
        code, _ = _run(d, ref=name)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], (name, err)
    for argv, message in (
        (["--batch_size", "12"], "multiple of the 8 devices"),
    ):
        capsys.readouterr()
        code, _ = _run(d, *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1]
    capsys.readouterr()
    assert eval_samples.main(["--samples", str(d / "samples.npz"), "--ref", str(d / "ref.npz"),
                              "--inception", str(d)]) == 2
    assert "--inception" in capsys.readouterr().err
    assert eval_samples.main(["--ref", str(d / "ref.npz"), "--inception", str(d / "inception")]) == 2


@pytest.mark.parametrize("module", ["eqvae_jax.eval_samples", "eqvae_jax.evaluate"])  # evaluate: the former name
def test_cli_entry_point_usage_error(module):
    proc = subprocess.run([sys.executable, "-m", module, "--samples", "x.npz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--ref" in proc.stderr


TWO_PROCESS_SCRIPT = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from eqvae_jax import eval_samples
sys.exit(eval_samples.main(sys.argv[3:]))
"""


def test_two_processes_give_the_same_numbers(setup, tmp_path):
    """Multi-host for real on one machine: 2 processes x 2 CPU devices (gloo), each feeding its own rows and
    gathering all features; process 0 alone prints and writes the JSON, equal to the one-process result."""
    d, _, _, _ = setup
    code, single = _run(d, "--no_cache", out="single.json")
    assert code == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    argv = ["--samples", str(d / "samples.npz"), "--ref", str(d / "ref.npz"), "--inception", str(d / "inception"),
            "--batch_size", "8", "--quiet", "--no_cache", "--no-distributed"]
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, f"localhost:{port}", str(i), *argv,
                               "--out", str(tmp_path / f"multi{i}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "FID" in outputs[0] and "FID" not in outputs[1]  # one table, from process 0
    assert not (tmp_path / "multi1.json").exists()
    multi = json.loads((tmp_path / "multi0.json").read_text())
    for key in single:
        assert multi[key] == pytest.approx(single[key], rel=1e-5), key
