"""Schema and checks of the paper's reconstruction evaluation (`python -m eqvae_jax.eval_vae`, configs/eval_vae.py).

Defaults are the EQ-VAE reference's `eval.py` protocol: the 50,000 ImageNet validation images, torchvision
`Resize(256)` + `CenterCrop(256)` (`resize_center_crop`), reconstructions decoded from a posterior *sample*
(KL; a VQ model decodes its quantized codes), rFID of the 50K reconstructions against the 50K originals, PSNR,
SSIM, LPIPS, plus the paper's latent analyses: the equivariance error per transform and family, and the
intrinsic dimension (TwoNN) of the latents. One deliberate default: rFID's Inception input is ADM's evaluator
preprocessing (`fid_preprocess='adm'`, as every other FID here); the reference's pytorch-fid preprocessing is
`fid_preprocess='pytorch_fid'`.

`models` maps a name (a directory name: letters, digits, '_', '-', '.') to an `AutoencoderSpec` section; several
models are evaluated in one pass over the data and compared side by side. `parse_config` lists every problem at
once: unknown keys, a weights dir of the wrong kind (`kind='vq_vae'` against a KL model), image sizes the
equivariance transforms cannot use, and missing Inception / LPIPS dirs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import jax
from ml_collections import ConfigDict

from eqvae_jax.data.config import DataConfig
from eqvae_jax.eval.equivariance import EquivarianceEvalConfig
from eqvae_jax.eval.inception import KIND as INCEPTION_KIND
from eqvae_jax.eval.inception import PREPROCESSES
from eqvae_jax.losses import resample
from eqvae_jax.models import lpips, weights
from eqvae_jax.models.autoencoders import AutoencoderSpec
from eqvae_jax.models.shapes_classifier import KIND as SHAPES_KIND
from eqvae_jax.parallel.mesh import mesh_shape, slice_count
from eqvae_jax.train.config import MeshConfig
from eqvae_jax.typed_config import ConfigError, default_config, parse_collect

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PRECISIONS = ("highest", "high", "default")
RANDOM = "random"  # inception / lpips: randomly initialised networks (tests and the :tiny demo only)


@dataclasses.dataclass(frozen=True)
class EvalVAEConfig:
    # {name: AutoencoderSpec fields}; after `parse_config`, {name: AutoencoderSpec}. Several models share one pass
    # over the data (each image is decoded once) and are compared side by side.
    models: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The held-out images: `data.eval_split` of a TFDS dataset (imagenet2012 'validation') or `data.eval_folder`,
    # cropped by `data.eval_transform` ('resize_center_crop': Resize(256) + CenterCrop(256)) at data.image_size.
    data: DataConfig = DataConfig()
    num_images: int = 50_000  # the first N images of the split (0 = all); fewer is a warning, none an error
    global_batch_size: int = 256  # images per step over all devices and hosts
    # Images per resumable shard (rounded up to a multiple of global_batch_size * max(1, data.worker_count)). Each
    # shard's results are written to WORKDIR/shards/ when it is done; a rerun skips the shards on disk.
    shard_size: int = 4096
    mesh: MeshConfig = MeshConfig()
    seed: int = 0  # posterior-sample noise (per image, from its position in the evaluation stream)
    sample_posterior: bool = True  # decode z = mean + std * eps (the reference); False: decode the mean
    # Matmul/conv precision of the autoencoders and LPIPS ('highest' = float32 also on TPU, whose default is one
    # bf16 pass; the reference ran PyTorch fp32 with TF32 convolutions on A100s, between 'high' and 'highest').
    precision: str = "highest"
    # FID Inception weights dir (python -m eqvae_jax.convert --kind inception), or a shapes classifier's dir
    # (eval/shapes_metric.py: shapes-rFID, for data.source='shapes'); 'random': tests
    inception: str = ""
    # The Inception's input preprocessing for rFID (eval.inception PREPROCESSES): 'adm' = ADM's evaluator /
    # torch-fidelity (TF1 bilinear resize to 299, (x - 128) / 128), comparable with gFID numbers; 'pytorch_fid' =
    # pytorch-fid, what zelaki/eqvae's eval.py (the paper's Table 1) uses (x / 255, torch bilinear resize with
    # half-pixel centres, 2 x - 1). Same weights; results/<model>.json and the table say which. A shapes
    # classifier takes its own input (any preprocessing other than 'adm' is refused for it).
    fid_preprocess: str = "adm"
    lpips: str = ""  # LPIPS weights dir (python -m eqvae_jax.convert --kind lpips); '' = no LPIPS; 'random': tests
    equivariance: EquivarianceEvalConfig = EquivarianceEvalConfig()  # the paper's rotations and scales
    # TwoNN intrinsic dimension of the latents (posterior mean; VQ: pre-quantization features), one flattened
    # latent per image, over the images at the first `id_images` positions of the evaluation (0 = skip).
    id_images: int = 10_000
    preview_images: int = 8  # images shown per model in the comparison plot (reconstruction + latent PCA)
    compilation_cache_dir: str = ""  # '' = WORKDIR/jax_cache

    def specs(self) -> dict[str, AutoencoderSpec]:
        """{name: spec} (the parsed `models`)."""
        return {n: s if isinstance(s, AutoencoderSpec) else AutoencoderSpec(**s) for n, s in self.models.items()}

    def shard_unit(self) -> int:
        """Shard sizes are multiples of this: one global batch per data worker, so no shard but the last pads."""
        return self.global_batch_size * max(1, self.data.worker_count)

    def effective_shard_size(self) -> int:
        unit = self.shard_unit()
        return max(1, -(-self.shard_size // unit)) * unit


def defaults() -> ConfigDict:
    """The schema as a ConfigDict (config files start here)."""
    return default_config(EvalVAEConfig)


def model_section(**fields: Any) -> ConfigDict:
    """An `AutoencoderSpec` section with every key present (so `--config.models.NAME.KEY=v` overrides work)."""
    section = default_config(AutoencoderSpec)
    for key, value in fields.items():
        section[key] = value
    return section


def _weights_problem(name: str, path: str, kind: str, what: str) -> str | None:
    try:
        got, _ = weights.read_config(path)
    except (FileNotFoundError, ValueError) as e:
        return f"{name}={path!r}: {e} ({what})"
    if got != kind:
        return f"{name}={path!r} holds a {got!r} model, not {kind!r} ({what})"
    return None


def _network_problems(c: EvalVAEConfig) -> list[str]:
    problems = []
    if not c.inception:
        problems.append("inception is empty: give the FID Inception weights dir (python -m eqvae_jax.convert "
                        "--kind inception --src pt_inception-2015-12-05-6726825d.pth --dst weights/inception)")
    elif c.inception != RANDOM:
        # the FID Inception, or a shapes classifier (eval/shapes_metric.py) for shapes-rFID on data.source='shapes'
        kind = INCEPTION_KIND
        with contextlib.suppress(FileNotFoundError, ValueError):  # reported below
            kind = SHAPES_KIND if weights.read_config(c.inception)[0] == SHAPES_KIND else INCEPTION_KIND
        problems += [p for p in [_weights_problem("inception", c.inception, kind,
                                                  "python -m eqvae_jax.convert --kind inception")] if p]
    if c.lpips not in ("", RANDOM):
        problems += [p for p in [_weights_problem("lpips", c.lpips, lpips.KIND,
                                                  "python -m eqvae_jax.convert --kind lpips")] if p]
    return problems


def _shape_problems(name: str, spec: AutoencoderSpec, c: EvalVAEConfig) -> list[str]:
    """The image size must suit the autoencoder and every equivariance transform (checked before compiling)."""
    f, size = spec.model_config().downsample_factor, c.data.image_size
    if size % f:
        return [f"data.image_size={size} is not divisible by models.{name}'s downsampling factor {f}"]
    problems = []
    for n, d in c.equivariance.scales:
        if not 0 < n < d:
            problems.append(f"equivariance.scales: ({n}, {d}) is not a downscale n/d in (0, 1)")
            continue
        image, latent = resample.resized_size(size, n, d), resample.resized_size(size // f, n, d)
        if image != f * latent:
            problems.append(f"equivariance scale {n}/{d}: a {size} px image becomes {image} px, its {size // f} "
                            f"latent {latent} (models.{name}: x{f} = {f * latent} px); choose scales with "
                            f"image_size/{f} * n/d integral")
    for k in c.equivariance.rotations:
        if k % 4 == 0:
            problems.append(f"equivariance.rotations: {k} quarter turns is the identity")
    return problems


def parse_config(config: ConfigDict | dict, num_devices: int | None = None, check_files: bool = True
                 ) -> EvalVAEConfig:
    """The typed config (models parsed into `AutoencoderSpec`s), or a ConfigError listing every problem.
    `check_files=False` skips the checks that read weights dirs."""
    c, problems = parse_collect(EvalVAEConfig, config)
    specs: dict[str, AutoencoderSpec] = {}
    if not c.models:
        problems.append("models is empty: name at least one autoencoder (configs/eval_vae.py:models=a+b)")
    for name, raw in c.models.items():
        where = f"models.{name}"
        if not NAME.match(name):
            problems.append(f"{where}: a model name must be letters, digits, '_', '-' or '.' (a directory name)")
        spec, spec_problems = parse_collect(AutoencoderSpec, raw, where)
        problems += spec_problems
        if not spec_problems:
            own = spec.problems(where) if check_files or spec.init != "weights" else []
            problems += own
            if not own and (check_files or spec.init != "weights"):
                problems += _shape_problems(name, spec, c)
        specs[name] = spec
    c = dataclasses.replace(c, models=specs)
    problems += c.data.problems()
    if c.data.output_dtype != "uint8":
        problems.append("data.output_dtype must be 'uint8': the evaluation reads the crops' own pixels")
    devices = jax.device_count() if num_devices is None else num_devices
    try:
        data, fsdp = mesh_shape(devices, c.mesh.data, c.mesh.fsdp, slice_count())
        if c.global_batch_size < 1 or c.global_batch_size % (data * fsdp):
            problems.append(f"global_batch_size={c.global_batch_size} is not a positive multiple of the "
                            f"{data * fsdp} batch shards (mesh data={data} x fsdp={fsdp})")
    except ValueError as e:
        problems.append(str(e))
    if c.num_images < 0 or c.shard_size < 1 or c.id_images < 0 or c.preview_images < 0:
        problems.append("need num_images >= 0, shard_size >= 1, id_images >= 0 and preview_images >= 0")
    if 0 < c.id_images < 3:
        problems.append(f"id_images={c.id_images}: TwoNN needs at least 3 latents (0 skips it)")
    if c.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, not {c.precision!r}")
    if c.fid_preprocess not in PREPROCESSES:
        problems.append(f"fid_preprocess must be one of {PREPROCESSES} (ADM's evaluator or pytorch-fid), not "
                        f"{c.fid_preprocess!r}")
    if check_files:
        problems += _network_problems(c)
    if problems:
        raise ConfigError(problems)
    return c
