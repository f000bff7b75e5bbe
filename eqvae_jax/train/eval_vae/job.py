"""The paper's reconstruction evaluation of KL and VQ autoencoders, side by side (configs/eval_vae.py).

    python -m eqvae_jax.eval_vae --config=configs/eval_vae.py:models=sd_vae+eq_vae --workdir=DIR

Per image, as zelaki/eqvae's `eval.py` (its numbers are the paper's Table 1): the crop x (uint8, from the data
pipeline's `eval_transform`) scaled to [-1, 1]; a KL model decodes a posterior *sample*
z = mean + std * eps (eps drawn per image from `seed` and the image's position in the evaluation stream,
so the draw does not depend on the batch size or device count); a VQ model decodes its quantized codes. Then

  rFID   Inception pool features of the reconstructions against those of the originals, both quantised like the
         reference's PNGs (`clamp(127.5 x + 128, 0, 255)` truncated; exact for the originals), the Frechet
         distance of ADM's evaluator (`adm_metrics`) with the reconstructions as the sample batch. The Inception's
         input preprocessing is `fid_preprocess`: 'adm' (default; ADM's evaluator, TF1 resize) or 'pytorch_fid'
         (the reference's pytorch-fid: torch bilinear resize with half-pixel centres, 2 x / 255 - 1);
  PSNR / SSIM / LPIPS   `eval.reconstruction` (PSNR on the quantised uint8 images; SSIM and LPIPS on the
         unclamped float images);
  equivariance error   `eval.equivariance` per transform and per family, on the posterior mean (KL) or the
         pre-quantization features (VQ, plus the fraction of codes that commute with each rotation);
  intrinsic dimension  TwoNN (`eval.latents.twonn_dimension`) of one flattened latent per image (posterior
         mean, or VQ pre-quantization features) for the images at stream positions < `id_images`. Per image,
         not per latent position: a per-position vector has only C (4) dimensions, while the paper reports
         62.2 (SD-VAE) and 39.4 (EQ-VAE). The paper does not say how many images it used; 10,000 by default.

Everything per image runs in one jitted program per model with the batch sharded over every device (and
host); the Inception runs on the reconstructions where they are (`InceptionExtractor.on_device`). Results are
gathered to every process, and process 0 writes them per shard (`shards`), which makes the run
resumable: a rerun computes only the shards (and models) that are not on disk yet. Finally process 0 reads all
shards and writes the results (`report`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from eqvae_jax.data import pipeline
from eqvae_jax.data.iterator import InputIterator
from eqvae_jax.data.sources import open_source
from eqvae_jax.eval import adm_metrics, inception, latents, reconstruction
from eqvae_jax.eval import equivariance as eq_eval
from eqvae_jax.eval.features import InceptionExtractor
from eqvae_jax.memo import cached_when_hashable
from eqvae_jax.models import kl_vae, lpips, shapes_classifier, weights
from eqvae_jax.models.autoencoders import AutoencoderSpec, build_autoencoder
from eqvae_jax.parallel.mesh import batch_sharding, local_rows, make_mesh, replicated
from eqvae_jax.storage import resolve
from eqvae_jax.train.eval_vae import report
from eqvae_jax.train.eval_vae.config import RANDOM, EvalVAEConfig, parse_config
from eqvae_jax.train.eval_vae.shards import ORIGINALS, ShardMismatchError, ShardPlan, ShardStore, fingerprint
from eqvae_jax.train.run_dir import enable_compilation_cache, write_config

log = logging.getLogger(__name__)
EQ = "equivariance/"


class EvalVAEError(ValueError):
    """The evaluation cannot run as configured (e.g. no images to evaluate)."""


@dataclasses.dataclass
class Model:
    """One autoencoder under evaluation: its jitted step, replicated state and the config of its shards."""

    name: str
    spec: AutoencoderSpec
    step: Callable[..., dict[str, Any]]
    state: nnx.State
    shard_config: dict[str, Any]


def make_step(vae: nnx.Module, lpips_net: lpips.LPIPS | None, sample_posterior: bool,
              eq_config: eq_eval.EquivarianceEvalConfig, mesh: jax.sharding.Mesh):
    """jit (vae_state, lpips_state, uint8 images, positions, key) -> {'metrics': {name: (B,)}, 'recon': uint8,
    'latent': (B, h, w, c) float32}, sharded like the batch (module docstring for the definitions)."""
    graphdef, _ = nnx.split(vae)
    lpips_graph = nnx.split(lpips_net)[0] if lpips_net is not None else None
    return _jitted_step(graphdef, lpips_graph, isinstance(vae, kl_vae.KLVAE), sample_posterior, eq_config, mesh)


@cached_when_hashable(maxsize=8)  # the same jitted step for the same graphs: one trace per process
def _jitted_step(graphdef: nnx.GraphDef, lpips_graph: nnx.GraphDef | None, is_kl: bool, sample_posterior: bool,
                 eq_config: eq_eval.EquivarianceEvalConfig, mesh: jax.sharding.Mesh):
    def step(vae_state, lpips_state, images, positions, key):
        x = (images.astype(jnp.float32) - 127.5) * (1.0 / 127.5)  # the data pipeline's exact [-1, 1] scaling
        model = nnx.merge(graphdef, vae_state)
        if is_kl:
            posterior = model.encode(x)
            z = posterior.mean
            if sample_posterior:
                eps = jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(key, p), z.shape[1:], z.dtype))(
                    positions)
                z = posterior.mean + posterior.std * eps
            recon, latent = model.decode(z), posterior.mean
            errors = eq_eval.equivariance_errors(lambda a: model.encode(a).mean, x, eq_config)
        else:
            encoding = model.encode(x)
            recon, latent = model.decode(encoding.quantized), encoding.latents
            errors = eq_eval.vq_equivariance(model, x, eq_config)
        metrics = {"psnr": reconstruction.psnr(recon, x), "ssim": reconstruction.ssim(recon, x),
                   **{EQ + k: v for k, v in errors.items()}}
        if lpips_graph is not None:
            metrics["lpips"] = nnx.merge(lpips_graph, lpips_state)(x, recon)
        return {"metrics": metrics, "recon": reconstruction.to_uint8(recon), "latent": latent}

    batch, rep = batch_sharding(mesh), replicated(mesh)
    return jax.jit(step, in_shardings=(rep, rep, batch, batch, rep), out_shardings=batch)


def _to_host(tree: Any) -> Any:
    """A batch-sharded pytree as numpy on every process."""
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


class _Range:
    """Records [start, stop) of a source, as a source (picklable for Grain's worker processes)."""

    def __init__(self, source: Any, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.source[self.start + index]


def shard_iterator(c: EvalVAEConfig, source: Any, bounds: tuple[int, int], mesh: jax.sharding.Mesh
                   ) -> InputIterator:
    """Global uint8 batches {'image', 'label', 'mask'} of one shard (the eval pipeline over its records)."""
    sharding = batch_sharding(mesh)
    per_process = c.global_batch_size // jax.process_count()
    part = _Range(source, *bounds)
    dataset = pipeline.eval_dataset(c.data, part, per_process, jax.process_index(), jax.process_count())
    batches = pipeline.eval_num_batches(len(part), per_process, jax.process_count(), c.data.worker_count)
    return InputIterator(dataset, sharding, c.global_batch_size, c.data.prefetch, scale_on_device=False,
                         num_batches=batches)


def _data_fingerprint(c: EvalVAEConfig) -> dict[str, Any]:
    d = c.data
    where = {"tfds_name": d.tfds_name, "eval_split": d.eval_split} if d.source != "folder" else {
        "eval_folder": d.eval_folder}
    if d.source == "shapes":  # the images are a function of these
        where = {"shapes_seed": d.shapes_seed, "shapes_size": d.shapes_size or d.image_size,
                 "shapes_eval_size": d.shapes_eval_size}
    return {"source": d.source, **where, "image_size": d.image_size, "eval_transform": d.eval_transform,
            "min_side": d.min_side, "global_batch_size": c.global_batch_size}


def build_inception(path: str, preprocess: str = "adm") -> inception.InceptionV3 | shapes_classifier.ShapesClassifier:
    """The rFID feature network: the FID Inception with the given input preprocessing ('adm' / 'pytorch_fid'),
    or a shapes classifier (shapes-rFID, eval/shapes_metric.py; it takes its own input)."""
    if path == RANDOM:
        log.warning("eval_vae: a random tiny Inception (tests/demo only: its rFID means nothing)")
        return inception.build(inception.tiny(preprocess=preprocess), seed=0)
    if weights.read_config(path)[0] == shapes_classifier.KIND:
        if preprocess != "adm":
            raise ValueError(f"fid_preprocess={preprocess!r} is for the FID Inception; {path} is a shapes classifier")
        log.info("eval_vae: rFID in the features of the shapes classifier %s (comparable within shapes only)", path)
        return shapes_classifier.load(path)
    return inception.load(path, preprocess=preprocess)


def build_lpips(path: str) -> lpips.LPIPS | None:
    if not path:
        log.info("eval_vae: no LPIPS (config.lpips is empty)")
        return None
    if path == RANDOM:
        log.warning("eval_vae: random LPIPS weights (tests/demo only; not a perceptual metric)")
        return lpips.build(seed=0)
    return lpips.load(path)


def build_models(c: EvalVAEConfig, mesh: jax.sharding.Mesh, base: dict[str, Any],
                 lpips_net: lpips.LPIPS | None) -> list[Model]:
    out = []
    for name, spec in c.specs().items():
        vae = build_autoencoder(spec)
        shard_config = {**base, "model": dataclasses.asdict(spec), "weights": fingerprint(vae, vae.config.to_dict()),
                        "lpips": fingerprint(lpips_net), "seed": c.seed, "sample_posterior": c.sample_posterior,
                        "precision": c.precision, "equivariance": dataclasses.asdict(c.equivariance),
                        "id_images": c.id_images}
        state = jax.device_put(nnx.split(vae)[1], replicated(mesh))
        out.append(Model(name, spec, make_step(vae, lpips_net, c.sample_posterior, c.equivariance, mesh), state,
                         shard_config))
    return out


class _Collector:
    """Host rows of one owner in one shard: every valid image's metrics/features, plus the rows kept for the
    intrinsic dimension and the preview."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, key: str, rows: np.ndarray) -> None:
        self.parts.setdefault(key, []).append(rows)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}


def _compute_shard(c: EvalVAEConfig, shard: int, plan: ShardPlan, source: Any, mesh: jax.sharding.Mesh,
                   extractor: InceptionExtractor, models: list[Model], originals: bool,
                   lpips_state: nnx.State | None, bar: tqdm) -> tuple[dict[str, _Collector], dict[str, list[str]]]:
    """Run the missing owners of one shard: (their collected host rows, their metric names), on every process."""
    start, stop = plan.bounds(shard)
    batch_size = c.global_batch_size
    sharding = batch_sharding(mesh)
    rows = local_rows(sharding, batch_size)
    key = jax.device_put(jax.random.key(c.seed), replicated(mesh))
    collected = {m.name: _Collector() for m in models}
    if originals:
        collected[ORIGINALS] = _Collector()
    metric_names: dict[str, list[str]] = {}

    def dispatch(index: int, batch: dict[str, jax.Array]) -> tuple[int, dict[str, Any]]:
        p0 = start + index * batch_size
        positions = jax.make_array_from_process_local_data(
            sharding, (p0 + np.arange(batch_size, dtype=np.int32))[rows], (batch_size,))
        outs: dict[str, Any] = {"mask": batch["mask"]}
        if originals:
            outs[ORIGINALS] = {"pool": extractor.on_device(batch["image"])["pool"]}
            if p0 < c.preview_images:
                outs[ORIGINALS]["preview_images"] = batch["image"]
        for m in models:
            with jax.default_matmul_precision(c.precision):  # a trace-time setting: the models' programs only
                out = m.step(m.state, lpips_state, batch["image"], positions, key)
            entry = {"metrics": out["metrics"], "pool": extractor.on_device(out["recon"])["pool"]}
            if p0 < c.id_images:
                entry["latents"] = out["latent"]
            if p0 < c.preview_images:
                entry["preview_latents"] = out["latent"]
                entry["preview_recon"] = out["recon"]
            outs[m.name] = entry
        return p0, outs

    def collect(p0: int, outs: dict[str, Any]) -> None:
        host = _to_host(outs)
        mask = host.pop("mask").astype(bool)
        position = p0 + np.arange(batch_size)
        keep = {"latents": mask & (position < c.id_images), "preview": mask & (position < c.preview_images)}
        for owner, entry in host.items():
            col = collected[owner]
            for k, v in entry.items():
                if k == "metrics":
                    metric_names[owner] = sorted(v)
                    col.add("metrics", np.stack([v[n] for n in metric_names[owner]], axis=1)[mask])
                elif k.startswith("preview"):
                    col.add(k, v[keep["preview"]])
                elif k == "latents":
                    col.add(k, v[keep["latents"]])
                else:
                    col.add(k, v[mask])
        in_range = position < stop  # the last batch is padded past the shard's end
        skipped = int((in_range & ~mask).sum())  # unreadable or too small: counted, so the bar reaches 100%
        bar.update(int(in_range.sum()))
        if skipped:
            bar.skipped_images = getattr(bar, "skipped_images", 0) + skipped
            bar.set_postfix(skipped=bar.skipped_images, refresh=False)

    iterator = shard_iterator(c, source, (start, stop), mesh)
    pending = None
    try:
        for index, batch in enumerate(iterator):
            current = dispatch(index, batch)  # queued on the devices while the previous batch is collected
            if pending is not None:
                collect(*pending)
            pending = current
        if pending is not None:
            collect(*pending)
    finally:
        iterator.close()
    return collected, metric_names


def _scan(store: ShardStore, plan: ShardPlan, owners: Mapping[str, dict[str, Any]]) -> np.ndarray:
    """(shards, owners) bool of complete shards, decided on process 0 and broadcast (hosts may not share the
    workdir's view); a shard computed with another config is an error on every process."""
    done = np.zeros((plan.count, len(owners)), np.int32)
    problems = []
    if jax.process_index() == 0:
        for s in range(plan.count):
            for j, (owner, config) in enumerate(owners.items()):
                ok, problem = store.status(owner, s, config)
                done[s, j] = 1 if ok else (-1 if problem else 0)
                if problem and len(problems) < 3:
                    problems.append(problem)
    if jax.process_count() > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if (done < 0).any():
        raise ShardMismatchError("; ".join(problems) or "the workdir holds shards of another configuration "
                                 "(process 0 names them)")
    return done.astype(bool)


def run(config: ConfigDict | EvalVAEConfig, workdir: str, stop_after_shards: int | None = None) -> dict[str, Any]:
    """Evaluate (or resume evaluating) every model of `config` in `workdir`.

    Returns {'computed': shards computed by this call, 'stopped': bool, 'results': {model: scalars} (process 0,
    when every shard is done; else None), 'outputs': {name: path}}. `stop_after_shards=N` returns after N newly
    computed shards, as a preemption would (the tests interrupt runs this way).
    """
    c = config if isinstance(config, EvalVAEConfig) else parse_config(config)
    workdir = resolve(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(c.compilation_cache_dir or f"{workdir}/jax_cache")
    write_config(workdir, c)
    source = open_source(c.data, train=False)
    total = len(source) if c.num_images == 0 else min(c.num_images, len(source))
    if c.num_images > len(source):
        warnings.warn(f"the held-out set has {len(source)} images, fewer than num_images={c.num_images}: "
                      f"evaluating {len(source)}", adm_metrics.EvaluationWarning, stacklevel=2)
    if total == 0:
        raise EvalVAEError(f"no images to evaluate in {source!r}")
    plan = ShardPlan(total, c.effective_shard_size())
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp)
    extractor = InceptionExtractor(build_inception(c.inception, c.fid_preprocess), mesh, c.global_batch_size)
    lpips_net = build_lpips(c.lpips)
    lpips_state = jax.device_put(nnx.split(lpips_net)[1], replicated(mesh)) if lpips_net is not None else None
    base = {"data": _data_fingerprint(c), "inception": extractor.fingerprint[:16], "preview_images": c.preview_images}
    models = build_models(c, mesh, base, lpips_net)
    owners = {ORIGINALS: base, **{m.name: m.shard_config for m in models}}
    store = ShardStore(workdir, plan)
    done = _scan(store, plan, owners)
    log.info("eval_vae: %d images in %d shards of %d; models %s; %d of %d shard files already done",
             total, plan.count, plan.size, ", ".join(m.name for m in models), int(done.sum()), done.size)
    main = jax.process_index() == 0
    computed: list[int] = []
    finished = [plan.bounds(s)[1] - plan.bounds(s)[0] for s in range(plan.count) if done[s].all()]
    with tqdm(total=total, initial=sum(finished), desc="eval_vae", unit="img", disable=not main) as bar:
        for s in range(plan.count):
            if done[s].all():
                continue
            if stop_after_shards is not None and len(computed) >= stop_after_shards:
                return {"computed": computed, "stopped": True, "results": None, "outputs": {}}
            todo = [m for j, m in enumerate(models) if not done[s, j + 1]]
            began = time.perf_counter()
            collected, metric_names = _compute_shard(c, s, plan, source, mesh, extractor, todo, not done[s, 0],
                                                     lpips_state, bar)
            if main:
                for owner, col in collected.items():
                    arrays = col.arrays()
                    store.write(owner, s, owners[owner], arrays, images=len(arrays["pool"]),
                                metric_names=metric_names.get(owner, []))
            computed.append(s)
            start, stop = plan.bounds(s)
            log.info("eval_vae: shard %d/%d (images %d-%d; %s) done in %.1fs", s + 1, plan.count, start, stop - 1,
                     ", ".join(sorted(collected)), time.perf_counter() - began)
    if not main:
        return {"computed": computed, "stopped": False, "results": None, "outputs": {}}
    results, previews = aggregate(store, plan, [m.name for m in models], c)
    outputs = report.write_all(workdir, c, results, previews)
    return {"computed": computed, "stopped": False, "results": results, "outputs": outputs}


def _gather(store: ShardStore, plan: ShardPlan, owner: str) -> tuple[dict[str, np.ndarray], list[str]]:
    parts: dict[str, list[np.ndarray]] = {}
    names: list[str] = []
    for s in range(plan.count):
        meta, arrays = store.read(owner, s)
        names = meta.get("metric_names") or names
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}, names


def aggregate(store: ShardStore, plan: ShardPlan, names: list[str], c: EvalVAEConfig
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """({model: scalars}, previews) from the shard files: the means of the per-image metrics (equivariance errors
    also per family), rFID, the intrinsic dimension and the image counts; previews = {'_originals': {'images'},
    model: {'recon', 'pca'}} for the comparison plot."""
    originals, _ = _gather(store, plan, ORIGINALS)
    count = len(originals["pool"])
    if count == 0:
        raise EvalVAEError("every image of the evaluation was skipped (unreadable or too small): nothing to score")
    if count < adm_metrics.MIN_FID_IMAGES:
        warnings.warn(f"rFID from {count} images: fewer than {adm_metrics.MIN_FID_IMAGES} give a rank-deficient "
                      "covariance, biased upward and not comparable to the paper's 50K-vs-50K numbers",
                      adm_metrics.EvaluationWarning, stacklevel=2)
    reference = adm_metrics.Statistics.of(originals["pool"])
    previews: dict[str, dict[str, np.ndarray]] = {ORIGINALS: {"images": originals.get("preview_images")}}
    results = {}
    for name in names:
        arrays, metric_names = _gather(store, plan, name)
        means = {k: float(np.mean(arrays["metrics"][:, j], dtype=np.float64)) for j, k in enumerate(metric_names)}
        scalars = eq_eval.with_families(means, c.equivariance, prefix=EQ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", adm_metrics.EvaluationWarning)  # the count warning was given above
            scalars["rfid"] = adm_metrics.frechet_distance(adm_metrics.Statistics.of(arrays["pool"]), reference,
                                                           what="rFID")
        lat = arrays.get("latents")
        scalars["intrinsic_dimension"] = float("nan")
        if lat is not None and len(lat) >= 3:
            scalars["intrinsic_dimension"] = latents.twonn_dimension(lat.reshape(len(lat), -1))
        elif c.id_images:
            warnings.warn(f"{name}: {0 if lat is None else len(lat)} latents for the intrinsic dimension; TwoNN "
                          "needs 3 or more (NaN)", adm_metrics.EvaluationWarning, stacklevel=2)
        scalars["id_images"] = float(0 if lat is None else len(lat))
        scalars["images"] = float(len(arrays["pool"]))
        results[name] = scalars
        if "preview_latents" in arrays and len(arrays["preview_latents"]):
            previews[name] = {"recon": arrays["preview_recon"],
                              "pca": latents.pca_rgb(arrays["preview_latents"], c.data.image_size)}
    return results, previews
