"""Read and write PyTorch-style state dicts as {name: numpy array}.

safetensors files are read with the numpy backend (no torch needed); pickled `.ckpt`/`.pt`/`.pth`/`.bin`
files need torch (a conversion-only dependency) and are always loaded with `weights_only=True`.

Lightning training checkpoints (`last.ckpt`) also pickle optimizer states, callback states and
hyper-parameters, which may name classes that the weights-only unpickler refuses (callbacks keyed by their
class, OmegaConf configs, Lightning's AttributeDict, numpy scalars). Such a file is read with every global that
torch does not allowlist replaced by an inert stand-in (`StandIn`): a class that accepts any construction or
state and does nothing, registered under the refused name for this one load. The real class or function is
never imported or called, modules torch blocks (os, sys, ...) stay refused, and only the tensors of the state
dict are kept.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

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
    obj = _torch_load(path)
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


class StandIn:
    """An inert stand-in for a pickled global that torch's weights-only unpickler refuses.

    Subclasses (one per refused name, `stand_in_for`) accept any call, construction and state and keep nothing.
    """

    stand_in_for = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<stand-in for {self.stand_in_for}>"


def _stand_in(name: str, container: type | None) -> type:
    # A refused dict/list subclass (e.g. Lightning's AttributeDict) is filled with SETITEMS/APPENDS, which the
    # weights-only unpickler only allows on exact dicts/lists: such names are replaced by dict/list themselves.
    return container or type(f"StandIn[{name}]", (StandIn,), {"stand_in_for": name})


_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")


def _torch_load(path: str) -> Any:
    """torch.load(weights_only=True), retried with inert stand-ins for refused globals (module docstring).

    The refused names come from a static scan of the pickle (zip format) or, for the legacy format, from the
    unpickler's own errors, one name per retry. A stand-in that the pickle fills like a dict or a list becomes a
    plain dict or list.
    """
    import argparse

    import torch

    stand_ins: dict[str, type] = {}
    for _ in range(_MAX_RETRIES):
        # Training checkpoints (DiT, fast-DiT) pickle their argparse.Namespace next to the weights.
        allowed = [argparse.Namespace, *((cls, name) for name, cls in stand_ins.items())]
        try:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            message = str(e)
            if not stand_ins and zipfile.is_zipfile(path):
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if names:
                    stand_ins = {name: _stand_in(name, None) for name in names}
                    continue
            refused = _REFUSED.search(message)
            if refused:
                name = refused[1] if "." in refused[1] else f"builtins.{refused[1]}"
                if name not in stand_ins:
                    stand_ins[name] = _stand_in(name, None)
                    continue
            filled = [n for n, c in stand_ins.items() if issubclass(c, StandIn) and f"{c.__name__}'" in message]
            container = dict if "SETITEM" in message else list if "lists" in message else None
            if not filled or container is None:
                raise ValueError(f"{path}: the weights-only unpickler refused it"
                                 f"{f' even with stand-ins for {sorted(stand_ins)}' if stand_ins else ''}: {e}") from e
            stand_ins[filled[0]] = container
            continue
        if stand_ins:
            log.info("%s: replaced %d pickled globals by inert stand-ins: %s", path, len(stand_ins), sorted(stand_ins))
        return obj
    raise ValueError(f"{path}: more than {_MAX_RETRIES} refused globals; not read.")


_MAX_RETRIES = 256


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
