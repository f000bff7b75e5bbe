"""The torch MaskGIT reference helpers shared by the MaskGIT model and converter tests: a tiny config, a
randomised valeoai v1 `MaskTransformer` (tests/torch_refs/maskgit_reference.py), its state dict and forward,
and inputs."""

import dataclasses

import numpy as np
import torch
from maskgit_reference import MaskTransformer

from eqvae_jax.convert.maskgit import valeoai_to_flax
from eqvae_jax.models import maskgit
from eqvae_jax.models.maskgit import MaskGITConfig
from eqvae_jax.models.weights import assign_variables

TINY = MaskGITConfig(hidden_dim=64, depth=2, heads=4, mlp_dim=96, codebook_size=32, grid_size=4, num_classes=10)


def reference(cfg: MaskGITConfig, seed: int = 0, std: float | None = 0.3) -> MaskTransformer:
    """The torch reference in eval mode; every tensor random (`std`) so zero-init biases hide nothing."""
    torch.manual_seed(seed)
    ref = MaskTransformer(hidden_dim=cfg.hidden_dim, codebook_size=cfg.codebook_size, f_factor=cfg.grid_size,
                          depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                          nclass=cfg.num_classes).eval()
    if std is not None:
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn_like(p) * std)
    return ref


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def ours_from(ref: MaskTransformer, cfg: MaskGITConfig, **overrides) -> maskgit.MaskGIT:
    model = maskgit.abstract(dataclasses.replace(cfg, **overrides))
    assign_variables(model, valeoai_to_flax(state_dict_np(ref), cfg))
    return model


def inputs(cfg: MaskGITConfig, n: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.codebook_size + 1, (n, cfg.grid_size, cfg.grid_size))  # codes and mask id
    labels = rng.integers(0, cfg.num_classes, n)
    drop = np.arange(n) % 2 == 1
    return tokens, labels, drop


def run_ref(ref: MaskTransformer, tokens, labels, drop) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(drop)).numpy()
