"""The notebooks' helpers, called directly: bad input (non-images, non-VAE hub repositories, checkpoints of the
wrong kind) gives a clear error and loses nothing; hub downloads convert what the hub serves (a local stand-in of
the hub client, also in the non-test code path); the comparison arrays, figures, job runner and DiT sample sheet."""

import io
import json
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

from eqvae_jax.convert import dit as convert_dit
from eqvae_jax.convert import kl_vae as convert_kl_vae
from eqvae_jax.diffusion import sampling
from eqvae_jax.eval import compare
from eqvae_jax.eval.equivariance import equivariance_errors
from eqvae_jax.losses import resample
from eqvae_jax.models import dit, kl_vae
from eqvae_jax.models.weights import KeyMismatchError
from eqvae_jax.notebook import errors, hub, inputs, jobs, runtime
from eqvae_jax.parallel.mesh import make_mesh

matplotlib.use("Agg")
from eqvae_jax import viz  # noqa: E402  (after choosing the headless backend)

TINY = dict(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, sample_size=16)


@pytest.fixture
def test_hub(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.TEST_ENV, "1")
    monkeypatch.setenv(hub.TEST_HUB_ENV, str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def vaes():
    return {"a": kl_vae.build(kl_vae.tiny(**TINY), seed=1), "b": kl_vae.build(kl_vae.tiny(**TINY), seed=2)}


def _png(size=(20, 12), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ bad input


def test_non_images_are_refused_by_name_and_nothing_is_written(tmp_path):
    files = {"ok.png": _png(), "notes.txt": b"not an image", "empty.jpg": b""}
    with pytest.raises(errors.NotAnImageError) as e:
        inputs.images_from_files(files, 16)
    assert "notes.txt (not an image file" in str(e.value) and "empty.jpg" in str(e.value)
    assert "ok.png" not in str(e.value)
    folder = tmp_path / "upload"
    with pytest.raises(errors.NotAnImageError):
        inputs.save_image_folder(files, str(folder))
    assert not folder.exists()
    with pytest.raises(errors.NotAnImageError, match="no images"):
        inputs.images_from_files({}, 16)


def test_images_from_files_and_upload_folder(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (30, 50), 255).save(buf, format="BMP")
    images, names = inputs.images_from_files({"red.png": _png(), "white.bmp": buf.getvalue()}, 8)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.float32 and names == ["red.png", "white.bmp"]
    np.testing.assert_allclose(images[1], 1.0)  # grey converted to RGB, centre-cropped, scaled to [-1, 1]
    np.testing.assert_allclose(images[0, 0, 0], np.array([200, 30, 40]) / 127.5 - 1.0, atol=1e-6)
    paths = inputs.save_image_folder({"red.png": _png(), "white.bmp": buf.getvalue()}, str(tmp_path / "f"))
    assert [os.path.basename(p) for p in paths] == ["red.png", "white.png"]  # .bmp re-encoded for the folder source
    assert Image.open(paths[1]).size == (30, 50)
    demo, demo_names = inputs.demo_images(16, 2)
    assert demo.shape == (2, 16, 16, 3) and demo_names == ["astronaut", "camera"]
    with pytest.raises(ValueError, match="unknown demo photographs"):
        inputs.demo_images(16, names=["nope"])


def test_non_vae_hub_repositories_are_refused_before_the_weights(test_hub):
    with pytest.raises(errors.NotAVAEError, match="clip-vit-base-patch32 is not a VAE: .*transformers CLIPModel"):
        hub.fetch_vae("openai/clip-vit-base-patch32", "weights/clip")
    assert not os.path.exists("weights/clip")
    with pytest.raises(errors.HubError, match="not a model repository"):
        hub.fetch_vae("nobody/nothing", "weights/x")
    with pytest.raises(errors.NotAVAEError, match="diffusers UNet2DModel, not a diffusers AutoencoderKL"):
        hub.check_vae_config({"_class_name": "UNet2DModel"}, "google/ddpm-cifar10-32")
    with pytest.raises(errors.NotAVAEError, match="up_block_types"):
        hub.check_vae_config({"_class_name": "AutoencoderKL", "block_out_channels": [8],
                              "up_block_types": ["AttnUpDecoderBlock2D"]}, "some/vae")
    os.makedirs("weights/occupied")
    with pytest.raises(FileExistsError, match="not converted KL-VAE weights"):
        hub.fetch_vae("zelaki/eq-vae", "weights/occupied")


def test_checkpoints_of_the_wrong_kind(test_hub):
    print(hub.fetch_vae("stabilityai/sd-vae-ft-ema", "weights/vae"))
    vae_file = hub.hub_file("stabilityai/sd-vae-ft-ema", "diffusion_pytorch_model.safetensors")
    with pytest.raises(KeyMismatchError, match="cannot infer the DiT size") as e:
        convert_dit.convert(vae_file, "weights/not_a_dit")
    assert "x_embedder.proj.weight" in e.value.missing
    assert not os.path.exists("weights/not_a_dit")
    with pytest.raises(ValueError, match="holds a 'kl_vae' model, not 'dit'"):
        dit.load("weights/vae")
    path = hub.fetch_dit_checkpoint("DiT-XL-2-256x256.pt", "ckpt")
    convert_dit.convert(path, "weights/dit")
    with pytest.raises(ValueError, match="holds a 'dit' model, not 'kl_vae'"):
        kl_vae.load("weights/dit")
    with pytest.raises(errors.HubError, match="not an official DiT checkpoint"):
        hub.fetch_dit_checkpoint("DiT-XXL.pt", "ckpt")


def test_report_errors(capsys):
    with errors.report_errors(stop=False):
        raise ValueError("bad value")
    assert capsys.readouterr().out == "error: ValueError: bad value\n"
    with pytest.raises(errors.NotebookError) as e, errors.report_errors():
        raise errors.NotAnImageError("x.txt is not an image")
    assert e.value._render_traceback_() == ["error: x.txt is not an image"]  # IPython shows only this line
    with pytest.raises(ZeroDivisionError), errors.report_errors(stop=False):  # a bug keeps its traceback
        _ = 1 / 0


# ------------------------------------------------------------------------------------------------ downloads


def test_test_mode_hub_round_trips_through_the_exporter(test_hub):
    summary = hub.fetch_vae("zelaki/eq-vae", "weights/eq")
    assert summary.startswith("kl_vae: diffusers") and "0.04M params" in summary
    assert "already holds" in hub.fetch_vae("zelaki/eq-vae", "weights/eq")
    repo = os.path.join(os.environ[hub.TEST_HUB_ENV], "zelaki", "eq-vae")
    with open(os.path.join(repo, "config.json")) as f:
        assert json.load(f)["_class_name"] == "AutoencoderKL"
    built = kl_vae.build(hub.TEST_VAE_CONFIG, seed=hub.TEST_VAES["zelaki/eq-vae"])
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(compare.reconstruct(kl_vae.load("weights/eq"), x), compare.reconstruct(built, x),
                               atol=1e-5)


class EntryNotFoundError(Exception):  # named like the hub client's errors, which hub_file recognises by name
    pass


class RepositoryNotFoundError(Exception):
    pass


def test_hub_client_path_with_a_pipeline_repository(tmp_path, monkeypatch):
    """Outside test mode, through a stand-in `hf_hub_download` serving a local pipeline repository (vae/)."""
    import huggingface_hub

    repo = tmp_path / "repo"
    flax = tmp_path / "flax"
    kl_vae.save(kl_vae.build(kl_vae.tiny(**TINY), seed=3), str(flax))
    convert_kl_vae.convert(str(flax), str(repo / "vae"), to="diffusers")
    (repo / "model_index.json").write_text("{}")
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append(filename)
        if repo_id != "org/pipeline":
            raise RepositoryNotFoundError(f"404 {repo_id}")
        if not (repo / filename).is_file():
            raise EntryNotFoundError(f"404 {filename}")
        return str(repo / filename)

    monkeypatch.delenv(runtime.TEST_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    summary = hub.fetch_vae("org/pipeline", str(tmp_path / "out"))
    assert summary.startswith(f"kl_vae: diffusers {repo / 'vae'}")
    assert calls == ["config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(errors.HubError, match="org/other is not a model repository"):
        hub.fetch_vae("org/other", str(tmp_path / "out2"))


def test_download_is_atomic(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    assert hub.download(src.as_uri(), str(tmp_path / "a" / "dst.bin")) == str(tmp_path / "a" / "dst.bin")
    assert (tmp_path / "a" / "dst.bin").read_bytes() == b"x" * 1000
    with pytest.raises(errors.HubError, match="downloading .* failed"):
        hub.download((tmp_path / "missing.bin").as_uri(), str(tmp_path / "b" / "dst.bin"))
    assert os.listdir(tmp_path / "b") == []


# ------------------------------------------------------------------------------------------------ comparisons


def test_compare_agrees_with_the_metric_and_the_transforms(vaes):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    table = compare.equivariance_table(vaes, x)
    direct = equivariance_errors(lambda a: vaes["b"].encode(a).mean, x)
    np.testing.assert_allclose(table["b"]["rot90"], np.mean(direct["rot90"]), rtol=1e-5)
    assert table["b"]["scale"] == pytest.approx(np.mean([table["b"][f"scale{s}"] for s in (0.25, 0.5, 0.75)]))
    assert table["a"]["rot90"] != pytest.approx(table["b"]["rot90"])
    decoded = compare.decode_transformed_latents(vaes["a"], x)
    np.testing.assert_allclose(decoded["identity"], compare.reconstruct(vaes["a"], x), atol=1e-6)
    assert decoded["scale0.5"].shape == (2, 8, 8, 3)
    targets = compare.transform_images(x, ("rot90", "scale0.5"))
    np.testing.assert_array_equal(targets["rot90"], np.asarray(resample.rot90(x, 1)))
    np.testing.assert_allclose(targets["scale0.5"], np.asarray(resample.resize(x, (1, 1), 2)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown transform 'rot45'"):
        compare.transform_images(x, ("rot45",))
    pictures = compare.latent_pictures(vaes, x, size=32)
    assert pictures["a"].shape == (2, 32, 32, 3) and pictures["a"].dtype == np.uint8
    assert compare.psnr(x, x + 0.02)[0] == pytest.approx(10 * np.log10(4 / 0.02**2))


def test_figures(vaes):
    x = np.zeros((3, 8, 8, 3), np.float32)
    fig = viz.image_rows({"a": x, "b": [x[0], np.zeros((4, 4, 3), np.uint8)]}, column_titles=["p", "q", "r"])
    assert len(fig.axes) == 6 and fig.axes[0].get_ylabel() == "a" and fig.axes[2].get_title() == "r"
    fig = viz.equivariance_bars({"m1": {"rot90": 0.5, "scale0.5": 0.2}, "m2": {"rot90": 0.1, "scale0.5": 0.3}})
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([0.5, 0.2, 0.1, 0.3])
    rows = [{"update": 0, "eval/equivariance/rotation": 0.9}, {"update": 1, "g/rec_l1": 0.5},
            {"update": 2, "g/rec_l1": "nan"}, {"update": 3, "g/rec_l1": 0.25, "eval/equivariance/rotation": 0.4}]
    updates, values = viz.series(rows, "g/rec_l1")
    assert updates.tolist() == [1, 3] and values.tolist() == [0.5, 0.25]
    fig = viz.training_curves(rows)
    assert [line.get_label() for line in fig.axes[2].lines] == ["rotation"]
    assert fig.axes[0].lines[0].get_ydata().tolist() == [0.5, 0.25]
    with pytest.raises(ValueError):
        viz.image_rows({})


# ------------------------------------------------------------------------------------------------ jobs


def test_job_command_uses_the_checkout_config():
    cmd = jobs.job_command("configs/sdvae_ft.py:tiny", "wd", {"total_updates": 3, "ema.enabled": True})
    assert cmd[:3] == [sys.executable, "-m", "eqvae_jax.main"]
    assert cmd[3] == f"--config={runtime.repo_path('configs', 'sdvae_ft.py')}:tiny"
    assert cmd[4:] == ["--workdir=wd", "--config.total_updates=3", "--config.ema.enabled=true"]
    with pytest.raises(FileNotFoundError, match="need a git checkout"):
        jobs.job_command("configs/nope.py", "wd")


_FAKE_JOB = """
import json, os, sys, time
wd = sys.argv[1]
for u in range(3):
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"update": u, "g/rec_l1": 1.0 / (u + 1)}) + "\\n")
    print("update", u, flush=True)
    time.sleep(0.3)
if len(sys.argv) > 2:
    print("error: invalid config:\\n  model.weights: not an eqvae-jax weights config")
    sys.exit(2)
"""


def test_run_job_reports_metrics_and_failures(tmp_path):
    seen = []
    log = jobs.run_job([sys.executable, "-c", _FAKE_JOB, str(tmp_path)], str(tmp_path),
                       on_update=lambda rows, tail: seen.append((len(rows), tail)), refresh_s=0.1)
    assert seen[-1][0] == 3 and seen[-1][1].endswith("update 2")
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    with open(log) as f:
        assert f.read().count("update") == 3
    with pytest.raises(errors.JobFailed) as e:
        jobs.run_job([sys.executable, "-c", _FAKE_JOB, str(tmp_path / "b"), "fail"], str(tmp_path / "b"), refresh_s=0.1)
    assert str(e.value) == ("the job stopped (exit status 2): invalid config:\n"
                            "  model.weights: not an eqvae-jax weights config")


def test_run_job_stops_the_job_when_the_cell_is_interrupted(tmp_path):
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('saved'), sys.exit(0)))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    marker = tmp_path / "marker"

    def interrupt(rows, tail):
        if "started" in tail:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs.run_job([sys.executable, "-c", script, str(marker)], str(tmp_path), on_update=interrupt, refresh_s=0.1)
    assert marker.read_text() == "saved"  # SIGTERM reached the job: it checkpoints and exits


def test_runtime_settings_and_download(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.TEST_ENV, "1")
    assert runtime.pick(test=1, cpu=2, accelerator=3) == 1
    monkeypatch.setenv(runtime.TEST_ENV, "0")
    assert runtime.pick(test=1, cpu=2, accelerator=3) == 2  # the tests run on CPU
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    path = runtime.offer_download(str(tmp_path / "export"))
    assert path == str(tmp_path / "export.zip") and os.path.isfile(path)
    with pytest.raises(FileNotFoundError, match="nothing to download"):
        runtime.offer_download(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ DiT samples


def test_sample_labels_matches_the_sharded_generator():
    """Chosen labels through sample_labels give the same images as make_generate's balanced labels (index % K)."""
    cfg = dit.DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=10)
    model, params = dit.functional(dit.build(cfg, seed=0))
    decode = sampling.make_decoder(kl_vae.build(kl_vae.tiny(**TINY), seed=0), 0.18215, 0.0)
    kw = dict(sampler="ddim", num_steps=2, cfg_scale=2.0)
    got = sampling.sample_labels(model, params, decode, list(range(8)), seed=5, **kw)
    mesh = make_mesh(-1, 1)
    generate = sampling.make_generate(model, decode, mesh, kw["sampler"], kw["num_steps"], kw["cfg_scale"],
                                      class_labels="cycle")
    want, labels = sampling.generate_all(generate, params, 5, 8, 8, mesh)
    assert labels.tolist() == list(range(8))
    assert got.shape == (8, 8, 8, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"class labels \[10\] are outside \[0, 10\)"):
        sampling.sample_labels(model, params, decode, [3, 10], **kw)


def test_notebook_package_needs_no_tensorflow_or_matplotlib():
    code = ("import sys, eqvae_jax.notebook, eqvae_jax.eval.compare; "
            "print(sorted(m for m in ('tensorflow', 'matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"
