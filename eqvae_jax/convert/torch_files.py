"""Read and write PyTorch-style state dicts as {name: numpy array}.

safetensors files are read with the numpy backend (no torch needed); pickled `.ckpt`/`.pt`/`.pth`/`.bin`
files need torch (a conversion-only dependency) and are always loaded with `weights_only=True`.
`write_torch_checkpoint` writes a `torch.save`-format file ({'state_dict': {name: tensor}}) without torch, so
that a training run can export a taming checkpoint on a machine without it.

Lightning training checkpoints (`last.ckpt`) also pickle optimizer states, callback states and
hyper-parameters, which may name classes that the weights-only unpickler refuses (callbacks keyed by their
class, OmegaConf configs, Lightning's AttributeDict, numpy scalars). Such a file is read with every global that
torch does not allowlist replaced by an inert stand-in (`StandIn`): a class that accepts any construction or
state and does nothing, registered under the refused name for this one load. The real class or function is
never imported or called, modules torch blocks (os, sys, ...) stay refused, and only the tensors of the state
dict are kept.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import re
import struct
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
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    if path.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean an unreadable file
            raise ValueError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
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
    try:
        obj = _torch_load(path)
    except RefusedPickleError:
        raise  # one line already, naming every global it refused to import
    except Exception as e:  # noqa: BLE001 - a truncated zip, a bad pickle, ...: all mean an unreadable file
        raise ValueError(f"{path}: not a readable torch checkpoint ({_one_line(e)})") from None
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


def _unpickler_reason(message: str) -> str:
    """The part of torch's weights-only error that names what was refused (after its generic preamble)."""
    found = re.search(r"WeightsUnpickler error:(.*)|(Trying to load unsupported GLOBAL .*)", message, re.S)
    return (found[1] or found[2]) if found else message


class RefusedPickleError(ValueError):
    """A checkpoint whose pickle needs globals that weights-only loading does not import (pickled code)."""


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
                raise RefusedPickleError(f"{path}: the weights-only unpickler refused it"
                                         f"{f' even with stand-ins for {sorted(stand_ins)}' if stand_ins else ''}: "
                                         f"{_one_line(_unpickler_reason(message))}") from None
            stand_ins[filled[0]] = container
            continue
        if stand_ins:
            log.info("%s: replaced %d pickled globals by inert stand-ins: %s", path, len(stand_ins), sorted(stand_ins))
        return obj
    raise ValueError(f"{path}: more than {_MAX_RETRIES} refused globals; not read.")


_MAX_RETRIES = 256


# torch's storage class per dtype (the name its unpickler resolves; weights_only allows these).
_STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
                  np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}
_ALIGNMENT = 64  # torch aligns each storage record's data to 64 bytes (what torch.load(mmap=True) expects)


class _Global:
    """A pickled reference to `module.name`, written as a GLOBAL opcode without importing the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # pickle's save_reduce only needs a callable
        raise TypeError(f"{self.module}.{self.name} is a pickle reference, not a function")


class _Storage:
    """One tensor's storage: pickled as torch's persistent id ('storage', type, key, 'cpu', numel)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.numel = key, numel
        self.type = _Global("torch", _STORAGE_TYPES[dtype])


class _Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, 0, shape, contiguous stride, False, OrderedDict())."""

    _REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64)) for i in range(len(self.shape)))
        return self._REBUILD, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table can write _Global as GLOBAL
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))

    dispatch[_Global] = _save_global_ref

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", obj.type, obj.key, "cpu", obj.numel)
        return None


def _write_record(zf: zipfile.ZipFile, name: str, data: bytes, align: bool) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    if align:  # pad the local header's extra field so that the data starts on a 64-byte boundary
        start = zf.fp.tell() + 30 + len(name.encode()) + 4
        info.extra = struct.pack("<HH", 0x4650, (-start) % _ALIGNMENT) + b"\0" * ((-start) % _ALIGNMENT)
    zf.writestr(info, data)


def write_torch_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                           wrap: str | None = "state_dict", extra: Mapping[str, Any] | None = None) -> None:
    """Write `{**extra, wrap: state_dict}` (or the bare state dict with wrap=None) in torch.save's zip format,
    without torch: what `torch.load(path, weights_only=True)` reads back as CPU tensors (Lightning checkpoints keep
    their weights under 'state_dict', the layout taming's `init_from_ckpt` reads). `extra`: plain Python values
    (ints, strings) stored next to the wrapped state dict.

    The layout is torch's (format version 3): `archive/data.pkl` (a protocol-2 pickle in which each tensor is
    `torch._utils._rebuild_tensor_v2` of a persistent-id storage), `archive/byteorder`, one raw little-endian
    record per tensor at `archive/data/<key>` (64-byte aligned) and `archive/version`.
    """
    tensors: dict[str, _Tensor] = {}
    records: list[tuple[str, bytes]] = []
    for i, (name, value) in enumerate(state_dict.items()):
        array = np.asarray(value)
        array = np.ascontiguousarray(array) if array.ndim else array  # (ascontiguousarray makes 0-d 1-d)
        if array.dtype not in _STORAGE_TYPES:
            raise ValueError(f"{name}: dtype {array.dtype} cannot be written as a torch tensor.")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        tensors[name] = _Tensor(_Storage(str(i), array.dtype, array.size), tuple(int(n) for n in array.shape))
        records.append((str(i), array.tobytes()))
    buffer = io.BytesIO()
    if extra and not wrap:
        raise ValueError("write_torch_checkpoint: extra entries need a wrap key for the state dict")
    _TorchPickler(buffer, protocol=2).dump({**(extra or {}), wrap: tensors} if wrap else tensors)
    with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED) as zf:
        _write_record(zf, "archive/data.pkl", buffer.getvalue(), align=False)
        _write_record(zf, "archive/byteorder", b"little", align=False)
        for key, data in records:
            _write_record(zf, f"archive/data/{key}", data, align=True)
        _write_record(zf, "archive/version", b"3\n", align=False)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file; `metadata` goes into its header (string values, read by `safetensors_metadata`)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.fspath(path),
              metadata=dict(metadata) if metadata else None)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file ({} when none, or for any other file)."""
    path = os.fspath(path)
    if not path.endswith(SAFETENSORS_SUFFIXES):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


class _Inert:
    """Whatever a checkpoint's pickle names (tensors, storages, classes) while `stored_note` reads it: nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _SkeletonUnpickler(pickle.Unpickler):
    """The container structure of a torch.save pickle without its tensors and without importing anything."""

    def find_class(self, module: str, name: str) -> Any:
        return dict if (module, name) == ("collections", "OrderedDict") else _Inert

    def persistent_load(self, pid: Any) -> None:
        return None


def stored_note(path: str | os.PathLike, key: str) -> str | None:
    """A string that `write_state_dict(notes=...)` stored beside the weights (None for any other file): the
    safetensors header entry, or the top-level entry of a torch.save zip checkpoint, read without its tensors."""
    path = os.fspath(path)
    if path.endswith(SAFETENSORS_SUFFIXES):
        return safetensors_metadata(path).get(key)
    if not (path.endswith(PICKLE_SUFFIXES) and os.path.isfile(path) and zipfile.is_zipfile(path)):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            obj = _SkeletonUnpickler(io.BytesIO(zf.read(name))).load() if name else None
    except Exception:  # noqa: BLE001 - unreadable: the weights reader names the problem
        return None
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *,
                     like: str | os.PathLike | None = None, wrap: str | None = None,
                     extra: Mapping[str, Any] | None = None, notes: Mapping[str, str] | None = None) -> None:
    """A state dict in the file type named by the suffix of `like` (default `path`; an atomic write passes its
    destination), without torch: `.safetensors` (the bare state dict) or a torch.save-format `.pt`/`.pth`/`.ckpt`/
    `.bin` (`write_torch_checkpoint` with `wrap` and `extra`). `notes`: strings stored beside the weights (the
    safetensors header, or top-level entries of the checkpoint next to `wrap`), read back by `stored_note`; the
    reference loaders never look at them."""
    name = os.fspath(path if like is None else like)
    if name.endswith(SAFETENSORS_SUFFIXES):
        write_safetensors(path, state_dict, notes)
    elif name.endswith(PICKLE_SUFFIXES):
        write_torch_checkpoint(path, state_dict, wrap=wrap, extra={**(extra or {}), **(notes or {})})
    else:
        raise ValueError(f"{name}: a state dict file ends in one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")


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
