"""The torch DiT reference helpers shared by the DiT model and converter tests: a tiny config, a randomised
official `DiT` (tests/torch_refs/dit_reference.py), its state dict and forward in NHWC, and inputs."""

import numpy as np
import torch
from dit_reference import DiT as TorchDiT
from flax import nnx

from eqvae_jax.convert.dit import official_to_flax
from eqvae_jax.models.dit import DiTConfig, build
from eqvae_jax.models.weights import assign_variables

TINY = DiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=64,
    depth=2,
    num_heads=2,
    num_classes=10,
    class_dropout_prob=0.1,
    learn_sigma=True,
)


def randomized_reference(cfg: DiTConfig, seed: int = 0, std: float = 0.15) -> TorchDiT:
    """The torch reference with every trainable tensor random (its zero-init layers would hide bugs)."""
    torch.manual_seed(seed)
    ref = TorchDiT(
        input_size=cfg.input_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        class_dropout_prob=cfg.class_dropout_prob,
        num_classes=cfg.num_classes,
        learn_sigma=cfg.learn_sigma,
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * std)
    return ref


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def ours_from(ref: TorchDiT, cfg: DiTConfig, **overrides) -> nnx.Module:
    model = build(DiTConfig(**{**cfg.__dict__, **overrides}))
    assign_variables(model, official_to_flax(state_dict_np(ref), cfg))
    return model


def inputs(cfg: DiTConfig, n: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, n).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, n)
    return x, t, y


def run_ref(ref: TorchDiT, x, t, y) -> np.ndarray:
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    return out.permute(0, 2, 3, 1).numpy()
