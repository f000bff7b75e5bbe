"""The replication chain (eqvae_jax/replicate): `configs/replicate.py:smoke` (both families, KL and VQ) end to end
once per module, then what a re-run does (finished stages skipped; the report redone when the stages it covers
change, e.g. a KL run that gains the VQ family) and what a bad config does. Checks that every stage ran and every
report field and figure exists, never the outcome."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_config
from PIL import Image

from eqvae_jax.replicate import stages
from eqvae_jax.replicate.chain import check, replicate
from eqvae_jax.replicate.config import ARMS, parse_config
from eqvae_jax.replicate.report import FILES
from eqvae_jax.replicate.runner import MARKER, RECORD, read_marker, read_record
from eqvae_jax.typed_config import ConfigError

pytestmark = pytest.mark.slow
SUITE_SECONDS = 330  # rough wall time on 2 cores: conftest starts the longest modules first
REPO = Path(__file__).resolve().parents[1]


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
    # classifier; KL: pretrain, 2 fine-tunes, eval, 2 caches, a DiT per arm and seed; the same for VQ; report
    assert len(names) == 1 + (4 + 2 + 2 * len(c.dit.seeds)) + (4 + 2 + 2 * len(c.maskgit.seeds)) + 1
    for k, name in enumerate(names, 1):
        assert f"stage {k}/{len(names)}: {name} (estimate" in console
        assert os.path.isfile(os.path.join(root, name, MARKER)), name
    assert list(read_record(root)) == names  # every stage's wall time, in run order
    for name in FILES:
        assert os.path.getsize(os.path.join(root, name)) > 0, name
    for name in ("curves.png", "samples.png", "latents.png"):
        with Image.open(os.path.join(root, name)) as im:
            assert im.size[0] > 100 and im.size[1] > 50, name
    with Image.open(os.path.join(root, "curves.png")) as im:
        assert im.size[0] > 2 * 640  # the DiT panel and the MaskGIT panel side by side
    with Image.open(os.path.join(root, "samples.png")) as im:
        assert im.size[1] > 2 * 4 * 3 * c.image_size  # a DiT row and a MaskGIT row of class grids
    m = json.loads(Path(root, "metrics.json").read_text())
    assert 0.0 <= m["classifier"]["held_out_accuracy"] <= 1.0
    for arm in ARMS:
        ae = m["autoencoder"][arm]
        for key in ("equivariance/rotation", "equivariance/scale", "equivariance/rot90", "equivariance/scale0.5",
                    "intrinsic_dimension", "hf_energy", "psnr", "ssim", "rfid", "scaling_factor"):
            assert isinstance(ae[key], float), (arm, key)
        assert set(m["dit_runs"][arm]) == {str(s) for s in c.dit.seeds}
    for arm in ARMS:
        vq = m["vq_autoencoder"][arm]
        for key in ("equivariance/rotation", "equivariance/scale", "equivariance/rot90", "equivariance/scale0.5",
                    "equivariance/codes/rotation", "intrinsic_dimension", "hf_energy", "psnr", "ssim", "rfid",
                    "codebook_usage", "codebook_perplexity"):
            assert isinstance(vq[key], float), (arm, key)
        assert set(m["maskgit_runs"][arm]) == {str(s) for s in c.maskgit.seeds}
    assert m["families"] == ["kl", "vq"]
    for summary, run in (("dit_summary", c.dit), ("maskgit_summary", c.maskgit)):
        updates = [str(u) for u in range(run.eval_every, run.updates + 1, run.eval_every)]
        assert list(m[summary]) == updates, summary
        for u in updates:
            row = m[summary][u]
            for arm in ARMS:
                for key in ("fid", "precision", "recall", "class_accuracy"):
                    assert row[arm][key]["seeds"] == len(run.seeds)
                    assert row[arm][key]["min"] <= row[arm][key]["mean"] <= row[arm][key]["max"]
            assert isinstance(row["fid_difference_exceeds_spread"], bool)
    assert set(m["stage_seconds"]) == set(names) - {"report"}
    report = Path(root, "report.md").read_text()
    for heading in ("## Autoencoders", "## Class-conditional DiT", "## VQ autoencoders", "## Class-conditional "
                    "MaskGIT", "codebook usage", "codes kept under rotation", "## Stage wall times", "shapes-rFID",
                    "TwoNN", "high-frequency energy", "curves.png", "samples.png", "latents.png", "maskgit_eq_seed0"):
        assert heading in report
    # every MaskGIT checkpoint scored once, with the same sample count as the DiT (one reference set)
    for s in c.maskgit.seeds:
        scores = Path(root, f"maskgit_eq_seed{s}", "sample_metrics")
        assert sorted(p.name for p in scores.glob("*.json")) == sorted(f"{u}.json" for u in updates)
    assert c.maskgit.num_samples == c.dit.num_samples


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


def test_a_run_that_gains_stages_redoes_only_the_report(chain):
    """A finished KL-only run (here: the same directory under `:smoke,kl`) continued with both families skips
    every finished stage and writes the report again; so does a report marker from before the report recorded
    what it covered (a run finished by an older version)."""
    config, root, _ = chain
    names = stage_names(config, root)
    kl_only = load_config("replicate", "smoke,kl")
    kl_names = stage_names(kl_only, root)
    assert [n for n in names if n in kl_names] == kl_names  # the KL stages keep their names and order
    console = run_quiet(kl_only, root)
    assert f"stage {len(kl_names)}/{len(kl_names)}: report (estimate" in console
    assert console.count("(done, skipped)") == len(kl_names) - 1
    m = json.loads(Path(root, "metrics.json").read_text())
    assert m["families"] == ["kl"] and "maskgit_summary" not in m
    console = run_quiet(config, root)  # the VQ family's stages are finished here: only the report runs
    assert f"stage {len(names)}/{len(names)}: report (estimate" in console
    assert console.count("(done, skipped)") == len(names) - 1
    assert "maskgit_summary" in json.loads(Path(root, "metrics.json").read_text())
    marker = read_marker(root, "report")
    del marker["inputs"]
    Path(root, "report", MARKER).write_text(json.dumps(marker))
    console = run_quiet(config, root)
    assert f"stage {len(names)}/{len(names)}: report (estimate" in console
    assert console.count("(done, skipped)") == len(names) - 1


def test_kl_stage_names_are_those_of_a_kl_only_run():
    """A run started before the VQ family existed continues: its stages keep their directory names."""
    c = parse_config(load_config("replicate"))
    seeds = [f"dit_{arm}_seed{s}" for s in c.dit.seeds for arm in ARMS]
    kl = ["classifier", "pretrain", "finetune_eq", "finetune_control", "eval", "latents_eq", "latents_control",
          *seeds]
    assert stage_names(load_config("replicate", "kl"), "/run") == [*kl, "report"]
    names = stage_names(load_config("replicate"), "/run")
    assert names[:len(kl)] == kl and names[-1] == "report"
    assert names[len(kl):-1] == ["vq_pretrain", "vq_finetune_eq", "vq_finetune_control", "vq_eval", "tokens_eq",
                                 "tokens_control", *[f"maskgit_{arm}_seed{s}" for s in c.maskgit.seeds
                                                     for arm in ARMS]]
    assert stage_names(load_config("replicate", "vq"), "/run") == ["classifier", *names[len(kl):]]


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
    # the VQ family's: a scale its f4 token grid cannot take, a taming-incompatible width, MaskGIT sizes
    bad = load_config("replicate", "smoke", **{"vq_autoencoder.scale_numerators": [5],
                                               "vq_autoencoder.base_channels": 48, "maskgit.eval_every": 3,
                                               "maskgit.num_samples": 48, "maskgit.heads": 5})
    with pytest.raises(ConfigError) as e:
        replicate(bad, root)
    text = str(e.value)
    assert "vq_finetune_eq: transform.scale_numerators [5]" in text
    assert "vq_autoencoder.base_channels=48 must be a positive multiple of 32" in text
    assert "maskgit.eval_every=3 must divide" in text
    assert "maskgit.num_samples=48 must equal dit.num_samples=32" in text
    assert "maskgit_eq: model:" in text and "not a multiple of heads 5" in text
    assert not os.path.exists(root)
    with pytest.raises(ConfigError, match="variants 'kl' and 'vq' each run one family"):
        load_config("replicate", "kl,vq")


def test_the_command_ends_a_bad_vq_value_with_exit_status_2(tmp_path):
    root = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "eqvae_jax.replicate", "--config=configs/replicate.py:smoke",
                          "--config.maskgit.eval_every=3", f"--workdir={root}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error:" in out.stderr and "maskgit.eval_every=3 must divide maskgit.updates=4" in out.stderr
    assert "Traceback" not in out.stderr
    assert not root.exists()


@pytest.mark.parametrize("variant", ["tpu", "smoke,kl", "smoke,vq"])  # (the default's eval batch of 50 does
# not split over the tests' 8 fake devices)
def test_variants_parse_with_every_stage_config(variant):
    c = check(load_config("replicate", variant), "/nonexistent/run")
    assert (c.kl, c.vq) == ("vq" not in variant, "kl" not in variant)
    if variant == "tpu":
        assert c.image_size == 64
