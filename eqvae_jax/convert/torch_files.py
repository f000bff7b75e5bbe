"""Read and write PyTorch-style state dicts as {name: numpy array}.

safetensors files are read with the numpy backend (no torch needed); pickled `.ckpt`/`.pt`/`.pth`/`.bin`
files need torch (a conversion-only dependency) and are loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike, entry: str | None = None) -> dict[str, np.ndarray]:
    """A flat state dict from a safetensors or torch pickle file; Lightning's {'state_dict': ...} unwrapped.

    `entry` picks one state dict from a pickle that wraps several (DiT training checkpoints hold
    {'model', 'ema', 'opt', 'args'}); it is ignored for a file that holds a flat state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights file at {path}.")
    if path.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith(PICKLE_SUFFIXES):
        return _read_torch_pickle(path, entry)
    raise ValueError(
        f"{path}: unknown weights format; expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}."
    )


def _read_torch_pickle(path: str, entry: str | None = None) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"Reading {path} needs torch (pip install -r requirements-dev.txt); safetensors files do not."
        ) from e
    import argparse

    # Training checkpoints (DiT, fast-DiT) pickle their argparse.Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}.")
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if nested and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        if entry is None or entry not in obj:
            raise ValueError(f"{path}: holds several entries ({', '.join(map(str, obj))}); "
                             f"choose the state dict with entry=NAME (got {entry!r}).")
        obj = obj[entry]
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:
                value = value.float()
            out[key] = value.detach().cpu().numpy()
    return out


def strip_wrapper_prefixes(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a 'module.' (DDP) or '_orig_mod.' (torch.compile) prefix that every key carries."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.fspath(path))


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight OIHW -> Flax HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(w: np.ndarray) -> np.ndarray:
    """Flax conv kernel HWIO -> PyTorch OIHW."""
    return np.transpose(w, (3, 2, 0, 1))


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight (out, in) -> Flax kernel (in, out)."""
    return np.transpose(w)


linear_to_torch = linear_to_flax
