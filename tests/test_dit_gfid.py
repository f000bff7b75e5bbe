"""Generation evaluation on a tiny DiT (8 fake devices) with a tiny random Inception and a tiny reference written by
`python -m eqvae_jax.eval_samples --write_ref`: the job's gFID monitoring runs every N updates and at the end (not at
update 0) and logs the five ADM numbers; they equal (FID/sFID/IS to 1e-4, precision/recall to one sample)
`python -m eqvae_jax.sample` (same settings) piped into `python -m eqvae_jax.eval_samples`, the end-to-end path; the
config checks name a missing Inception / reference, a reference of another Inception and a batch that does not
split over the devices."""

import json
import os

import numpy as np
import pytest
from absl import flags
from helpers import jax_cache, tiny_dit_config, toy_images, write_toy_cache

from eqvae_jax import eval_samples
from eqvae_jax import sample as sample_cli
from eqvae_jax.eval import inception
from eqvae_jax.eval.generation import GenerationEvaluator
from eqvae_jax.models import kl_vae
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.dit.config import parse_config
from eqvae_jax.train.metrics_file import read_metrics
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()
FIVE = ("fid", "sfid", "inception_score", "precision", "recall")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A toy latent cache, a tiny random Inception dir, and an ADM reference batch with its statistics."""
    d = tmp_path_factory.mktemp("gfid")
    write_toy_cache(str(d / "cache"))
    inception.save(inception.build(inception.tiny(), seed=3), d / "inception")
    np.savez(d / "ref_images.npz", arr_0=toy_images(24))
    code = eval_samples.main(["--ref", str(d / "ref_images.npz"), "--inception", str(d / "inception"),
                              "--write_ref", str(d / "ref.npz"), "--batch_size", "8", "--quiet"])
    assert code == 0
    return d


def _config(d, compile_cache="", **changes):
    fid = {"sample.fid_every_updates": 2, "sample.fid_num_samples": 24, "sample.fid_batch_size": 8,
           "sample.fid_reference": str(d / "ref.npz"), "sample.inception": str(d / "inception"),
           "sample.num_steps": 4}
    return tiny_dit_config(str(d / "cache"), compile_cache, total_updates=4, **{**fid, **changes})


def _record_samples(monkeypatch) -> list[np.ndarray]:
    """Spy on the job's evaluator: the uint8 samples each gFID evaluation draws (its generate calls' outputs)."""
    drawn: list[np.ndarray] = []
    original = GenerationEvaluator.sample_features

    def sample_features(self, params):
        generate, batches = self.generate, []

        def recording(*args):
            out = generate(*args)
            batches.append(np.asarray(out[0]))
            return out

        self.generate = recording
        try:
            return original(self, params)
        finally:
            self.generate = generate
            drawn.append(np.concatenate(batches)[: self.num_samples])

    monkeypatch.setattr(GenerationEvaluator, "sample_features", sample_features)
    return drawn


def test_gfid_during_training_equals_sample_then_evaluate(files, tmp_path_factory, monkeypatch):
    drawn = _record_samples(monkeypatch)
    compile_cache = jax_cache()  # the test run's one cache
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = dit_job.run(_config(files, compile_cache, **{"log.every_updates": 1}), workdir)
    evals = summary["evals"]
    assert sorted(evals) == [2, 4]  # every 2 updates and at the end; never at update 0
    for results in evals.values():
        assert set(results) == {f"eval/{k}" for k in FIVE}
        assert np.isfinite(results["eval/fid"]) and results["eval/fid"] > 0
    assert evals[2]["eval/fid"] != evals[4]["eval/fid"]  # the model changed between the two
    logged = [r for r in read_metrics(workdir) if "eval/fid" in r]
    assert [r["update"] for r in logged] == [2, 4] and logged[-1]["eval/fid"] == pytest.approx(evals[4]["eval/fid"])

    # The same draws through the two CLIs: sample the final EMA weights, then evaluate the ADM npz.
    path = sample_cli.run_sampling(workdir, {"num_samples": 24, "batch_size": 8})
    # The same draws (noise and labels): the images agree up to a last-bit rounding of a few pixel values.
    assert len(drawn) == 2
    with np.load(path) as npz:
        diff = np.abs(npz["arr_0"].astype(int) - drawn[-1].astype(int))
    print(f"sample CLI vs hook images: max |diff| {diff.max()}, {int((diff > 0).sum())} of {diff.size} values differ")
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    out = os.path.join(workdir, "evaluate.json")
    code = eval_samples.main(["--samples", path, "--ref", str(files / "ref.npz"), "--inception",
                              str(files / "inception"), "--out", out, "--batch_size", "8", "--quiet", "--no_cache"])
    assert code == 0
    with open(out) as f:
        cli = json.load(f)
    hook = {k: evals[4][f"eval/{k}"] for k in FIVE}
    print(f"gFID hook at update 4: {hook}\n  sample + evaluate CLIs: {cli}")
    for key in ("fid", "sfid", "inception_score"):
        assert cli[key] == pytest.approx(hook[key], rel=1e-4), key
    # Precision/recall count points inside k-NN radii: with the tiny random Inception the features crowd together,
    # so a last-bit difference of one feature (another batch split of the Inception) may move one point over a
    # radius: allow one of the 24.
    for key in ("precision", "recall"):
        assert cli[key] == pytest.approx(hook[key], abs=1.01 / 24), key


def test_gfid_config_checks(files, tmp_path):
    ok = parse_config(_config(files))
    assert ok.sample.fid_every_updates == 2
    other = tmp_path / "other_inception"
    inception.save(inception.build(inception.tiny(width_divisor=8), seed=0), other)  # 256-d pool features
    cases = {
        "sample.inception": (str(tmp_path / "missing"), "sample.inception="),
        "sample.fid_reference": (str(tmp_path / "missing.npz"), "sample.fid_reference: "),
        "sample.fid_batch_size": (12, "is not a multiple of the 8 batch shards"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_config(_config(files, **{key: value}))
    with pytest.raises(ConfigError, match="a reference made with another Inception"):
        parse_config(_config(files, **{"sample.inception": str(other)}))
    with pytest.raises(ConfigError, match="sample.inception is empty"):
        parse_config(_config(files, **{"sample.inception": ""}))
    kl_vae.save(kl_vae.build(kl_vae.tiny(base_channels=8, norm_num_groups=4)), tmp_path / "vae")
    with pytest.raises(ConfigError, match="holds a 'kl_vae' model, not 'inception'"):
        parse_config(_config(files, **{"sample.inception": str(tmp_path / "vae")}))
    # Off (the default), or reading a finished run's config to sample from it: no file is read.
    parse_config(_config(files, **{"sample.fid_every_updates": 0, "sample.inception": "nowhere"}))
    parse_config(_config(files, **{"sample.inception": "nowhere", "sample.fid_reference": "none.npz"}),
                 check_cache=False)
