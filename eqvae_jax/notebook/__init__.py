"""Helpers of the Colab notebooks in notebooks/: everything a notebook does beyond calling the library.

- runtime: test mode (`EQVAE_NOTEBOOK_TEST=1`), settings per runtime (`pick`), the checkout, Colab upload/download;
- hub: download + convert pretrained weights (`fetch_vae`, `fetch_dit_checkpoint`), local stand-ins in test mode;
- inputs: demo photographs or uploaded files as model inputs, refusing non-images by name;
- jobs: the training job in a subprocess with a live view of WORKDIR/metrics.jsonl;
- errors: the errors above and `report_errors` (one clear line instead of a traceback).
"""

from eqvae_jax.notebook.errors import HubError, JobFailed, NotAnImageError, NotAVAEError, NotebookError, report_errors
from eqvae_jax.notebook.hub import fetch_dit_checkpoint, fetch_vae
from eqvae_jax.notebook.inputs import demo_images, images_from_files, save_image_folder
from eqvae_jax.notebook.jobs import job_command, run_job
from eqvae_jax.notebook.runtime import describe, mode, offer_download, pick, repo_path, test_mode, upload

__all__ = [
    "HubError", "JobFailed", "NotAVAEError", "NotAnImageError", "NotebookError", "demo_images", "describe",
    "fetch_dit_checkpoint", "fetch_vae", "images_from_files", "job_command", "mode", "offer_download", "pick",
    "repo_path", "report_errors", "run_job", "save_image_folder", "test_mode", "upload",
]
