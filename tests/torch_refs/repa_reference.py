"""TEST REFERENCE ONLY: transcriptions of sihyun-yu/REPA@67f7145 pieces (not part of the package).

`build_mlp` is `models/sit.py` build_mlp (torch); `proj_loss` is the projection-loss loop of `loss.py`
SILoss.__call__ in numpy (F.normalize = x / max(||x||, 1e-12); mean_flat of a 1-D tensor = its mean);
`si_loss` is the whole SILoss.__call__ (path 'linear', prediction 'v') in numpy with its random draws
(time_input, noises) passed in, and `train_loss` train.py's combination `loss.mean() + proj_coeff * proj_loss`;
`preprocess_raw_image` is `train.py`'s DINOv2 branch in torch, with torchvision's Normalize written out
((x - mean) / std per channel) because torchvision does not load here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, 1e-12)


def proj_loss(zs: list[np.ndarray], zs_tilde: list[np.ndarray]) -> float:
    total = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        for z_j, z_tilde_j in zip(z, z_tilde, strict=True):
            z_tilde_j = _normalize(z_tilde_j)
            z_j = _normalize(z_j)
            total += np.mean(-(z_j * z_tilde_j).sum(axis=-1))
    return total / (len(zs) * bsz)


def preprocess_raw_image(x: torch.Tensor) -> torch.Tensor:
    """x: uint8 NCHW."""
    resolution = x.shape[-1]
    x = x / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, 224 * (resolution // 256), mode="bicubic")


def mean_flat(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=tuple(range(1, x.ndim)))


def si_loss(model, images: np.ndarray, time_input: np.ndarray, noises: np.ndarray, zs: list[np.ndarray]):
    """SILoss(prediction='v', path_type='linear').__call__ with given draws: (denoising_loss (B,), proj_loss).

    `model(x, t) -> (output, zs_tilde)` in REPA's convention (t = 0 data, t = 1 noise); images (B, ...) latents.
    """
    t = time_input.reshape((-1,) + (1,) * (images.ndim - 1))
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - t, t, -1, 1  # interpolant, path_type == "linear"
    model_input = alpha_t * images + sigma_t * noises
    model_target = d_alpha_t * images + d_sigma_t * noises
    model_output, zs_tilde = model(model_input, time_input.flatten())
    denoising_loss = mean_flat((model_output - model_target) ** 2)
    return denoising_loss, proj_loss(zs, zs_tilde)


def train_loss(denoising_loss: np.ndarray, proj: float, proj_coeff: float = 0.5) -> float:
    """train.py: loss_mean + proj_loss_mean * args.proj_coeff."""
    return float(denoising_loss.mean() + proj * proj_coeff)
