"""The converter's files: every `--to` export of a KL autoencoder (diffusers, ldm) and of a discriminator
(taming) converts back with no extra flags (a non-default norm_num_groups, which the weight shapes do not show,
and a non-default discriminator size included), exports get the permissions of a plain file (0644 under umask
022), and an empty, truncated or corrupt weights file is one `error:` line naming it (exit status 1), not a
library traceback."""

import dataclasses
import os

import numpy as np
import pytest

from eqvae_jax.convert import __main__ as cli
from eqvae_jax.models import dinov2, discriminator, dit, kl_vae, maskgit, vq_vae, weights

CFG = kl_vae.tiny(norm_num_groups=8, base_channels=16)  # 8 groups: not the LDM default 32 the shapes would give


@pytest.fixture(scope="module")
def flax_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("convert") / "flax")
    kl_vae.save(kl_vae.build(CFG, seed=4), path)
    return path


def _modes(path: str) -> set[int]:
    if os.path.isfile(path):
        return {os.stat(path).st_mode & 0o777}
    return {os.stat(os.path.join(r, f)).st_mode & 0o777 for r, _, fs in os.walk(path) for f in fs}


@pytest.mark.parametrize("target,name", [("diffusers", "out"), ("ldm", "out.safetensors")])
def test_every_export_converts_back_without_flags_and_is_world_readable(flax_dir, tmp_path, target, name):
    out, back = str(tmp_path / name), str(tmp_path / "back")
    mask = os.umask(0o022)
    try:
        assert cli.main(["--kind", "kl_vae", "--to", target, "--src", flax_dir, "--dst", out]) == 0
        assert cli.main(["--kind", "kl_vae", "--src", out, "--dst", back]) == 0
    finally:
        os.umask(mask)
    assert _modes(out) == {0o644}
    assert weights.read_config(back)[1] == dataclasses.asdict(CFG) | {"channel_mult": list(CFG.channel_mult)}
    a, b = weights.load_weights(flax_dir)[2], weights.load_weights(back)[2]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _damaged(tmp_path, flax_dir: str) -> dict[str, str]:
    good = str(tmp_path / "good.safetensors")
    assert cli.main(["--kind", "kl_vae", "--to", "ldm", "--src", flax_dir, "--dst", good]) == 0
    data = (tmp_path / "good.safetensors").read_bytes()
    files = {"empty.ckpt": b"", "truncated_header.safetensors": data[:1000],
             "truncated_data.safetensors": data[: len(data) // 2], "garbage.bin": b"\x00not a pickle" * 50}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: str(tmp_path / name) for name in files}


def test_damaged_weights_files_are_one_line_naming_the_file(flax_dir, tmp_path, capsys):
    for name, path in _damaged(tmp_path, flax_dir).items():
        capsys.readouterr()
        assert cli.main(["--kind", "kl_vae", "--src", path, "--dst", str(tmp_path / f"o_{name}")]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: "), (name, err)
        assert not os.path.exists(tmp_path / f"o_{name}")


def test_discriminator_taming_export_converts_back(tmp_path):
    flax, out, back = str(tmp_path / "d"), str(tmp_path / "d.safetensors"), str(tmp_path / "back")
    discriminator.save(discriminator.build(discriminator.DiscriminatorConfig(ndf=16, n_layers=2), seed=1), flax)
    assert cli.main(["--kind", "discriminator", "--to", "taming", "--src", flax, "--dst", out]) == 0
    assert cli.main(["--kind", "discriminator", "--src", out, "--dst", back]) == 0
    assert weights.read_config(back)[1] == weights.read_config(flax)[1]
    a, b = weights.load_weights(flax)[2], weights.load_weights(back)[2]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# Exports of the other kinds, at reference head counts (the one thing their PyTorch layouts do not show and the
# converters infer from the width: DiT-S 384 -> 6, DINOv2 ViT-S 384 -> 6, MaskGIT 16) but otherwise tiny.
EXPORTS = {
    "vq_vae": ("taming", "out.ckpt", lambda: vq_vae.tiny(channel_mult=(1,), attn_resolutions=())),
    "dit": ("dit", "out.pt", lambda: dit.DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=384,
                                                   depth=1, num_heads=6, num_classes=3)),
    "maskgit": ("valeoai", "out.pth", lambda: maskgit.tiny(depth=1, hidden_dim=64, heads=16, mlp_dim=64,
                                                           grid_size=2, codebook_size=8, num_classes=3)),
    "dinov2_hub": ("hub", "out.pth", lambda: dinov2.DINOv2Config(hidden_size=384, depth=1, num_heads=6,
                                                                 pos_grid=2)),
    "dinov2_hf": ("hf", "out", lambda: dinov2.DINOv2Config(hidden_size=384, depth=1, num_heads=6, pos_grid=2)),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_other_exports_convert_back_without_flags(case, tmp_path):
    kind = case.split("_hub")[0].split("_hf")[0]
    module = {"vq_vae": vq_vae, "dit": dit, "maskgit": maskgit, "dinov2": dinov2}[kind]
    target, name, config = EXPORTS[case]
    flax, out, back = str(tmp_path / "flax"), str(tmp_path / name), str(tmp_path / "back")
    module.save(module.build(config(), seed=2), flax)
    assert cli.main(["--kind", kind, "--to", target, "--src", flax, "--dst", out]) == 0
    assert cli.main(["--kind", kind, "--src", out, "--dst", back]) == 0
    assert weights.read_config(back)[1] == weights.read_config(flax)[1]
    a, b = weights.load_weights(flax)[2], weights.load_weights(back)[2]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
