"""LPIPS (VGG) weights -> eqvae-jax weights directory: `--kind lpips --src SRC --dst DST [--extra lin=PATH]`.

SRC is either
  * a state dict of `lpips.LPIPS(net='vgg')`: `net.slice{1-5}.{i}.weight/bias` (i = the torchvision
    `features` index) and `lin{0-4}.model.1.weight` (lpips also saves them as `lins.{0-4}.*`: accepted);
    its `scaling_layer.shift/scale` buffers are accepted and checked against the constants; or
  * a torchvision VGG16 state dict (`features.{i}.weight/bias`; the unused `classifier.*` is skipped).
When SRC holds no lin heads they come from `lin=PATH`, by default the `weights/v0.1/vgg.pth` shipped inside
the installed `lpips` package (located without importing lpips, whose import needs torchvision).

Only `--to flax`: LPIPS is frozen, so there is nothing trained to export back.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping

import numpy as np

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, Row
from eqvae_jax.convert.options import check_destination, check_target, typed_options
from eqvae_jax.convert.torch_files import read_state_dict
from eqvae_jax.models import lpips as lpips_model
from eqvae_jax.models.weights import save_weights, variable_shapes

TARGETS = ("flax",)
OPTIONS = {"lin": str}
LIN_FILE = os.path.join("weights", "v0.1", "vgg.pth")


def _slice_of(index: int) -> int:
    """lpips' vgg16: features[0:4] -> slice1, [4:9] slice2, [9:16] slice3, [16:23] slice4, [23:30] slice5."""
    return 1 + sum(index >= b for b in (4, 9, 16, 23))


def _conv_layers() -> list[tuple[str, int, int, int]]:
    return [layer for layer in lpips_model.VGG16_LAYERS if layer != "pool"]


def key_map(source: str) -> KeyMap:
    """The 13 VGG convs in the `lpips` or `torchvision` layout, plus the 5 lin heads (1x1 convs)."""
    rows = []
    for name, index, _, _ in _conv_layers():
        prefix = f"net.slice{_slice_of(index)}.{index}" if source == "lpips" else f"features.{index}"
        rows += [Row(f"net/{name}/kernel", f"{prefix}.weight", "conv"), Row(f"net/{name}/bias", f"{prefix}.bias")]
    rows += [Row(f"lin{i}/kernel", f"lin{i}.model.1.weight", "conv") for i in range(len(lpips_model.TAP_CHANNELS))]
    return KeyMap(rows)


def default_lin_path() -> str:
    """The lin-head file shipped in the installed `lpips` package; a clear error when there is none."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "No lin-head weights: pass --extra lin=PATH (lpips' weights/v0.1/vgg.pth) or `pip install lpips`."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], LIN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The installed lpips package has no {LIN_FILE}; pass --extra lin=PATH.")
    return path


def _check_scaling(sd: Mapping[str, np.ndarray]) -> None:
    for key, want in (("scaling_layer.shift", lpips_model.SHIFT), ("scaling_layer.scale", lpips_model.SCALE)):
        if key in sd and not np.allclose(np.ravel(sd[key]), want, rtol=0, atol=1e-6):
            raise ValueError(f"{key} = {np.ravel(sd[key]).tolist()} differs from lpips v0.1's {list(want)}.")


def _merge_lins_alias(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lpips registers each head twice (`lin{i}`, ModuleList `lins.{i}`): keep `lin{i}`, check they agree."""
    out = {k: v for k, v in sd.items() if not k.startswith("lins.")}
    for key, value in sd.items():
        if key.startswith("lins."):
            name = "lin" + key[len("lins."):]
            if name in out and not np.array_equal(out[name], value):
                raise ValueError(f"{key} and {name} should be the same tensor but differ.")
            out.setdefault(name, value)
    return out


def flax_variables(sd: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray] | None = None,
                   what: str = "lpips") -> tuple[dict[str, np.ndarray], list[str]]:
    """(flat Flax variables, skipped torch keys) from an lpips or torchvision VGG16 state dict (+ lin heads).

    Raises KeyMismatchError naming missing / unexpected / mis-shaped PyTorch keys.
    """
    sd = _merge_lins_alias(sd)
    if any(k.startswith("net.slice") for k in sd):
        source, accepted = "lpips", ("scaling_layer.shift", "scaling_layer.scale")
        skipped: list[str] = []
        if lin is not None and any(k.startswith("lin") for k in sd):
            raise ValueError(f"{what} already holds lin heads; do not pass lin= as well.")
        torch_sd = dict(sd) if lin is None else {**sd, **lin}
    elif any(k.startswith("features.") for k in sd):
        source, accepted = "torchvision", ()
        skipped = sorted(k for k in sd if k.startswith("classifier."))
        if lin is None:
            raise ValueError(f"{what} is a torchvision VGG16 state dict; the lin heads come from lin=PATH.")
        torch_sd = {k: v for k, v in sd.items() if k not in skipped}
        torch_sd.update(lin)
    else:
        raise ValueError(f"{what}: neither an lpips (net.slice*) nor a torchvision VGG16 (features.*) file.")
    _check_scaling(torch_sd)
    own = {k: v for k, v in torch_sd.items() if k not in accepted}
    return key_map(source).to_flax(own, variable_shapes(lpips_model.abstract()), what), skipped


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: str) -> str:
    """Write the Flax weights directory `dst` from the PyTorch file `src`; returns a one-line summary."""
    check_target(lpips_model.KIND, to, TARGETS)
    lin = typed_options(lpips_model.KIND, options, OPTIONS).get("lin")
    check_destination(dst, overwrite)
    sd = read_state_dict(src)
    lin_sd = None
    if not any(k.startswith("lin") for k in sd):
        lin = lin or default_lin_path()
    if lin is not None:
        lin_sd = read_state_dict(lin)
    flat, skipped = flax_variables(sd, lin_sd, what=src)
    with atomic_path(dst, overwrite) as tmp:
        save_weights(tmp, lpips_model.KIND, dataclasses.asdict(lpips_model.LPIPSConfig()), flat)
    note = f" (skipped {len(skipped)} unused keys: {', '.join(skipped)})" if skipped else ""
    return f"lpips: wrote {len(flat)} frozen arrays to {dst}{note}"
