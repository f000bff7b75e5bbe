"""The replication chain (eqvae_jax/replicate): `configs/replicate.py:smoke` end to end once per module, then
what a re-run does and what a bad config does. Checks that every stage ran and every report field and figure
exists, never the outcome."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from helpers import load_config
from PIL import Image

from eqvae_jax.replicate import jobs, stages
from eqvae_jax.replicate.chain import replicate
from eqvae_jax.replicate.config import ARMS, parse_config
from eqvae_jax.replicate.report import FILES
from eqvae_jax.replicate.runner import MARKER, RECORD, read_record
from eqvae_jax.typed_config import ConfigError

pytestmark = pytest.mark.slow
SUITE_SECONDS = 200  # rough wall time on 2 cores: conftest starts the longest modules first


def run_quiet(config, workdir: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        replicate(config, workdir)
    return out.getvalue()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("replicate"))
    config = load_config("replicate", "smoke")
    return config, root, run_quiet(config, root)


def stage_names(config, root: str) -> list[str]:
    return [s.name for s in stages.build(parse_config(config), root)]


def test_every_stage_ran_and_the_report_is_complete(chain):
    config, root, console = chain
    c = parse_config(config)
    names = stage_names(config, root)
    assert len(names) == 5 + 2 + 2 * len(c.dit.seeds) + 1  # ... eval, 2 caches, a DiT per arm and seed, report
    for k, name in enumerate(names, 1):
        assert f"stage {k}/{len(names)}: {name} (estimate" in console
        assert os.path.isfile(os.path.join(root, name, MARKER)), name
    assert list(read_record(root)) == names  # every stage's wall time, in run order
    for name in FILES:
        assert os.path.getsize(os.path.join(root, name)) > 0, name
    for name in ("curves.png", "samples.png", "latents.png"):
        with Image.open(os.path.join(root, name)) as im:
            assert im.size[0] > 100 and im.size[1] > 50, name
    m = json.loads(Path(root, "metrics.json").read_text())
    assert 0.0 <= m["classifier"]["held_out_accuracy"] <= 1.0
    for arm in ARMS:
        ae = m["autoencoder"][arm]
        for key in ("equivariance/rotation", "equivariance/scale", "equivariance/rot90", "equivariance/scale0.5",
                    "intrinsic_dimension", "hf_energy", "psnr", "ssim", "rfid", "scaling_factor"):
            assert isinstance(ae[key], float), (arm, key)
        assert set(m["dit_runs"][arm]) == {str(s) for s in c.dit.seeds}
    updates = [str(u) for u in range(c.dit.eval_every, c.dit.updates + 1, c.dit.eval_every)]
    assert list(m["dit_summary"]) == updates
    for u in updates:
        row = m["dit_summary"][u]
        for arm in ARMS:
            for key in ("fid", "precision", "recall", "class_accuracy"):
                assert row[arm][key]["seeds"] == len(c.dit.seeds)
                assert row[arm][key]["min"] <= row[arm][key]["mean"] <= row[arm][key]["max"]
        assert isinstance(row["fid_difference_exceeds_spread"], bool)
    assert set(m["stage_seconds"]) == set(names) - {"report"}
    report = Path(root, "report.md").read_text()
    for heading in ("## Autoencoders", "## Class-conditional DiT", "## Stage wall times", "shapes-rFID", "TwoNN",
                    "high-frequency energy", "curves.png", "samples.png", "latents.png"):
        assert heading in report


def test_rerun_skips_every_finished_stage_and_redoes_a_missing_one(chain):
    config, root, _ = chain
    names = stage_names(config, root)
    record = read_record(root)
    console = run_quiet(config, root)
    for k, name in enumerate(names, 1):
        assert f"stage {k}/{len(names)}: {name} (done, skipped)" in console
    assert "(estimate" not in console
    assert read_record(root) == record  # nothing ran
    # a stage without its marker runs again (here the report: its files are rewritten)
    os.remove(os.path.join(root, "report", MARKER))
    os.remove(os.path.join(root, "metrics.json"))
    console = run_quiet(config, root)
    assert f"stage {len(names)}/{len(names)}: report (estimate" in console
    assert console.count("(done, skipped)") == len(names) - 1
    assert os.path.isfile(os.path.join(root, "metrics.json"))
    assert json.loads(Path(root, RECORD).read_text())["report"]["kind"] == "report"


def test_config_errors_come_before_any_work(tmp_path):
    root = str(tmp_path / "run")
    typo = load_config("replicate", "smoke")
    typo.dit.updatse = 3
    with pytest.raises(ConfigError, match=r"unknown key 'dit.updatse' \(did you mean 'dit.updates'\?\)"):
        replicate(typo, root)
    # the chain's own problems and those only the jobs' schemas see, listed at once with their stage: a scale the
    # f4 latent grid cannot take (the fine-tunes), an unknown DiT objective
    bad = load_config("replicate", "smoke", **{"autoencoder.scale_numerators": [5], "dit.objective": "flow",
                                               "dit.eval_every": 3})
    with pytest.raises(ConfigError) as e:
        replicate(bad, root)
    text = str(e.value)
    assert "finetune_eq: transform.scale_numerators [5]" in text
    assert "dit_eq: objective must be one of" in text
    assert "dit.eval_every=3 must divide" in text
    assert not os.path.exists(root)  # nothing built, nothing written


def test_tpu_variant_parses_with_every_stage_config():
    c = parse_config(load_config("replicate", "tpu"))
    jobs.check_all(c, "/nonexistent/run")
    assert c.image_size == 64
