"""DiT's Gaussian diffusion schedule (DiT `gaussian_diffusion.py` + `respace.py`), host side.

All quantities are computed once in float64 numpy, as the reference does, and gathered per timestep as
float32 inside jitted code. `Schedule` is a NamedTuple of arrays, so it can be closed over or passed to jit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Schedule(NamedTuple):
    """Per-step arrays of a (possibly respaced) diffusion; index t = 0 is the least noisy step."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    timestep_map: np.ndarray  # model timestep (original process index) of each step

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    """`get_named_beta_schedule('linear', n)`: linspace(1e-4, 0.02) scaled by 1000 / n, float64."""
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Timesteps kept when respacing ("250", "10,15,20" per equal section, or "ddimN"), as `respace.py`."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def make_schedule(betas: np.ndarray, timestep_map: np.ndarray | None = None) -> Schedule:
    """All derived quantities of `GaussianDiffusion.__init__` for `betas` (float64)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must be a 1-D array in (0, 1]")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
    return Schedule(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
        timestep_map=np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map),
    )


def create_schedule(respacing: str | list[int] = "", num_steps: int = 1000) -> Schedule:
    """DiT's `create_diffusion(respacing)` schedule: linear betas, respaced like `SpacedDiffusion`.

    "" (training) keeps all `num_steps`; "250" gives the 250-step sampling schedule whose betas are
    1 - alphas_cumprod[t_k] / alphas_cumprod[t_{k-1}] over the kept steps, with the model still fed the
    original timestep numbers (`timestep_map`).
    """
    base = make_schedule(linear_betas(num_steps))
    if respacing in ("", None):
        return base
    keep = space_timesteps(num_steps, respacing)
    last, new_betas, tmap = 1.0, [], []
    for i, ac in enumerate(base.alphas_cumprod):
        if i in keep:
            new_betas.append(1 - ac / last)
            last = ac
            tmap.append(i)
    return make_schedule(np.array(new_betas), np.array(tmap))
