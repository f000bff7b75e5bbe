"""Download pretrained weights and convert them with the project's converters, with clear errors.

    fetch_vae("zelaki/eq-vae", "weights/eq_vae")                      # diffusers AutoencoderKL -> Flax weights
    fetch_dit_checkpoint("DiT-XL-2-256x256.pt", "checkpoints")        # the official DiT release file

`fetch_vae` reads the repository's config.json first (a few bytes) and refuses anything that is not a diffusers
`AutoencoderKL` before the weights are downloaded; a pipeline repository's `vae/` subfolder is used when the
root has no config.json. The conversion is `eqvae_jax.convert.kl_vae.convert`, the same code as
`python -m eqvae_jax.convert --kind kl_vae`. A destination that already holds converted KL-VAE weights is kept
(notebook cells can be re-run).

Test mode (`runtime.test_mode()`): the hub is a local directory of tiny random-weight models written in the
real layouts by the project's own exporters (a diffusers AutoencoderKL per known VAE repository, a transformers
config for the non-VAE example, the official DiT state dict via `--to dit`), so the notebooks exercise the same
download-then-convert path offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable

from eqvae_jax.convert import dit as convert_dit
from eqvae_jax.convert import kl_vae as convert_kl_vae
from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.models import dit, kl_vae, weights
from eqvae_jax.notebook.errors import HubError, NotAVAEError
from eqvae_jax.notebook.runtime import test_mode

CONFIG = "config.json"
VAE_WEIGHTS = convert_kl_vae.DIFFUSERS_WEIGHTS  # safetensors first, then the pickled .bin
DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"  # facebookresearch/DiT download.py
DIT_CHECKPOINTS = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
TEST_HUB_ENV = "EQVAE_NOTEBOOK_HUB"  # test mode: where the local stand-in hub lives (default: a temp dir)

# Test mode: the stand-ins. Tiny f2 KL-VAEs (8/16 channels, 4 latent channels like SD-VAE) with distinct seeds.
TEST_VAES = {"stabilityai/sd-vae-ft-mse": 1, "stabilityai/sd-vae-ft-ema": 2, "zelaki/eq-vae": 3,
             "zelaki/eq-vae-ema": 4}
TEST_VAE_CONFIG = kl_vae.tiny(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, sample_size=32)
TEST_NOT_VAE = {"openai/clip-vit-base-patch32": {"architectures": ["CLIPModel"], "model_type": "clip"}}
# A DiT-S-width model (the converter infers 6 heads from hidden 384) with one block on 8x8x4 latents.
TEST_DIT_CONFIG = dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6)


# ------------------------------------------------------------------------------------------------ the hub


def hub_file(repo_id: str, filename: str) -> str:
    """Local path of one file of a hub model repository (downloaded into the Hugging Face cache)."""
    if test_mode():
        path = os.path.join(_test_repo(repo_id), filename)
        if not os.path.isfile(path):
            raise HubError(f"{repo_id} has no file {filename!r}.")
        return path
    try:
        from huggingface_hub import hf_hub_download  # downloads only: preinstalled on Colab
    except ImportError as e:
        raise HubError("downloading from the hub needs huggingface_hub: pip install huggingface_hub") from e
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # the hub client's errors differ between versions: name them, keep the cause
        kind = type(e).__name__
        if "EntryNotFound" in kind:
            raise HubError(f"{repo_id} has no file {filename!r}.") from e
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            raise HubError(f"{repo_id} is not a model repository on the Hugging Face hub (or it is private).") from e
        if "GatedRepo" in kind:
            raise HubError(f"{repo_id} is gated: accept its license on the hub and log in "
                           "(huggingface_hub.login()).") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HubError(f"downloading {filename!r} from {repo_id} failed: {kind}: {first}") from e


def _has_file(repo_id: str, filename: str) -> str | None:
    try:
        return hub_file(repo_id, filename)
    except HubError as e:
        if "has no file" in str(e):
            return None
        raise


def check_vae_config(meta: dict, what: str) -> None:
    """Raise NotAVAEError unless a config.json dict describes a diffusers AutoencoderKL this project converts."""
    cls = meta.get("_class_name")
    if cls != "AutoencoderKL":
        if cls:
            found = f"a diffusers {cls}"
        elif meta.get("architectures"):
            found = f"a transformers {', '.join(meta['architectures'])}"
        else:
            found = f"a config without '_class_name' (keys: {', '.join(sorted(meta)[:8])})"
        raise NotAVAEError(f"{what} is not a VAE: its config.json describes {found}, not a diffusers AutoencoderKL "
                           "(e.g. stabilityai/sd-vae-ft-mse or zelaki/eq-vae).")
    try:
        convert_kl_vae.config_from_diffusers(meta)
    except ValueError as e:
        raise NotAVAEError(f"{what}: {e}") from None


def _existing_vae(dst: str) -> bool:
    if not os.path.exists(dst):
        return False
    try:
        kind, _ = weights.read_config(dst)
    except (FileNotFoundError, ValueError):
        kind = None
    if kind != kl_vae.KIND:
        raise FileExistsError(f"{dst} exists and is not converted KL-VAE weights; choose another destination.")
    return True


def fetch_vae(repo_id: str, dst: str) -> str:
    """Download a diffusers AutoencoderKL from the hub and convert it to a Flax weights dir at `dst`;
    returns the converter's one-line summary (or says that `dst` already holds converted weights)."""
    if _existing_vae(dst):
        return f"{dst} already holds converted KL-VAE weights (delete it to convert {repo_id} again)"
    subfolder = ""
    config_path = _has_file(repo_id, CONFIG)
    if config_path is None:
        subfolder = "vae/"
        config_path = _has_file(repo_id, subfolder + CONFIG)
    if config_path is None:
        raise NotAVAEError(f"{repo_id} is not a VAE: it has neither config.json nor vae/config.json.")
    with open(config_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise NotAVAEError(f"{repo_id}: {subfolder}config.json is not JSON ({e}).") from None
    check_vae_config(meta, repo_id)
    for name in VAE_WEIGHTS:
        path = _has_file(repo_id, subfolder + name)
        if path is not None:
            return convert_kl_vae.convert(os.path.dirname(path), dst)
    raise NotAVAEError(f"{repo_id}: no {' or '.join(VAE_WEIGHTS)} beside {subfolder}config.json.")


# ------------------------------------------------------------------------------------------------ URLs


def download(url: str, dst: str) -> str:
    """Download `url` to the file `dst` (atomically: a failed download leaves nothing); returns `dst`."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    state = {"next": 0.0}

    def progress(blocks: int, block_size: int, total: int) -> None:
        if total > 0 and blocks * block_size >= state["next"] * total:
            print(f"\r{os.path.basename(dst)}: {min(100.0, 100.0 * blocks * block_size / total):.0f}% "
                  f"of {total / 2**20:.0f} MiB", end="", flush=True)
            state["next"] += 0.05

    try:
        with atomic_path(dst, overwrite=False) as tmp:
            urllib.request.urlretrieve(url, tmp, reporthook=progress)
    except (urllib.error.URLError, OSError) as e:
        raise HubError(f"downloading {url} failed: {e}") from e
    print()
    return dst


def fetch_dit_checkpoint(name: str, dst_dir: str) -> str:
    """The official DiT checkpoint `name` (e.g. DiT-XL-2-256x256.pt) in `dst_dir`, downloaded unless present."""
    if name not in DIT_CHECKPOINTS:
        raise HubError(f"{name!r} is not an official DiT checkpoint; expected one of {', '.join(DIT_CHECKPOINTS)}.")
    path = os.path.join(dst_dir, name)
    if os.path.isfile(path):
        return path
    if test_mode():
        return _write_test_dit(path)
    return download(DIT_URL.format(name=name), path)


# ------------------------------------------------------------------------------------------------ test mode


def _test_hub_dir() -> str:
    return os.environ.get(TEST_HUB_ENV) or os.path.join(tempfile.gettempdir(), "eqvae_jax_test_hub")


def _test_repo(repo_id: str) -> str:
    """The stand-in repository directory of `repo_id`, written on first use."""
    path = os.path.join(_test_hub_dir(), *repo_id.split("/"))
    if os.path.isdir(path):
        return path
    if repo_id in TEST_VAES:
        with tempfile.TemporaryDirectory() as tmp:
            flax_dir = os.path.join(tmp, "flax")
            kl_vae.save(kl_vae.build(TEST_VAE_CONFIG, seed=TEST_VAES[repo_id]), flax_dir)
            _publish(lambda out: convert_kl_vae.convert(flax_dir, out, to="diffusers"), path)
    elif repo_id in TEST_NOT_VAE:
        def write(out: str) -> None:
            os.makedirs(out)
            with open(os.path.join(out, CONFIG), "w") as f:
                json.dump(TEST_NOT_VAE[repo_id], f)

        _publish(write, path)
    else:
        raise HubError(f"{repo_id} is not a model repository on the Hugging Face hub (test mode knows "
                       f"{', '.join(sorted([*TEST_VAES, *TEST_NOT_VAE]))}).")
    return path


def _publish(write: Callable[[str], object], path: str) -> None:
    """Write a directory atomically (concurrent test runs each publish a complete copy)."""
    with atomic_path(path, overwrite=True) as tmp:
        write(tmp)


def _write_test_dit(path: str) -> str:
    """A random DiT in the official state-dict layout at `path` (written by `convert --kind dit --to dit`)."""
    with tempfile.TemporaryDirectory() as tmp:
        flax_dir = os.path.join(tmp, "flax")
        model = dit.build(TEST_DIT_CONFIG, seed=0)
        weights.save_weights(flax_dir, dit.KIND, dataclasses.asdict(TEST_DIT_CONFIG), weights.flat_variables(model))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        convert_dit.convert(flax_dir, path, to="dit")
    return path
