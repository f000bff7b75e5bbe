"""DiT conversion: diffusers parity, official-layout round trip, training checkpoints, errors, CLI."""

import argparse
import os

import numpy as np
import pytest
import torch
from dit_parity import TINY, inputs, randomized_reference, run_ref, state_dict_np

from eqvae_jax.convert import dit as conv
from eqvae_jax.convert.__main__ import main as cli
from eqvae_jax.convert.torch_files import read_state_dict
from eqvae_jax.models import dit as dit_model
from eqvae_jax.models.weights import KeyMismatchError, read_config

HEADS = {"num_heads": "2"}  # hidden 64 is not a reference size


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(reference torch model, its state dict saved as a plain .pt)."""
    ref = randomized_reference(TINY)
    path = tmp_path_factory.mktemp("official") / "dit.pt"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def diffusers_model(shared_embedders: bool = True, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
        if shared_embedders:  # what diffusers' own DiT conversion script does
            first = m.transformer_blocks[0].norm1.emb.state_dict()
            for block in m.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return m


def test_diffusers_parity(tmp_path):
    m = diffusers_model()
    m.save_pretrained(tmp_path / "hf")
    summary = conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    assert "depth 2" in summary and "heads 2" in summary
    model = dit_model.load(str(tmp_path / "w"))
    assert model.config.timestep_freq_shift == 1
    x, t, y = inputs(TINY)
    with torch.no_grad():
        want = (
            m(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                timestep=torch.from_numpy(t).long(),
                class_labels=torch.from_numpy(y),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )
    got = np.asarray(model(x, t, y))
    err = np.abs(got - want).max()
    print(f"diffusers parity max abs err {err:.2e} (output max {np.abs(want).max():.2f})")
    assert err <= 1e-4, err
    assert np.abs(want).max() > 0.1
    # the reference timestep frequencies (shift 0) give a different function: the option matters
    conv.convert(str(tmp_path / "hf"), str(tmp_path / "w0"), timestep_freq_shift="0")
    assert np.abs(np.asarray(dit_model.load(str(tmp_path / "w0"))(x, t, y)) - want).max() > 1e-3


def test_diffusers_unshared_embedders_rejected(tmp_path):
    diffusers_model(shared_embedders=False).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb.*differs from block 0"):
        conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_diffusers_missing_and_wrong_config(tmp_path):
    from safetensors.numpy import load_file, save_file

    diffusers_model().save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    del sd["transformer_blocks.1.attn1.to_k.bias"]
    save_file(sd, str(f))
    with pytest.raises(KeyMismatchError, match=r"transformer_blocks\.1\.attn1\.to_k\.bias"):
        conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    cfg = (tmp_path / "hf" / "config.json").read_text().replace('"ada_norm_zero"', '"ada_norm"')
    (tmp_path / "hf" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="norm_type"):
        conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))


def test_official_parity_and_bitwise_round_trip(official, tmp_path):
    ref, pt = official
    summary = conv.convert(pt, str(tmp_path / "w"), **HEADS)
    assert "input 8x8x4" in summary and "10 classes" in summary and "learn_sigma=True" in summary
    kind, cfg = read_config(tmp_path / "w")
    assert (
        kind == "dit" and cfg["depth"] == 2 and cfg["num_classes"] == 10 and cfg["class_dropout_prob"] == 0.1
    )
    x, t, y = inputs(TINY)
    err = np.abs(np.asarray(dit_model.load(str(tmp_path / "w"))(x, t, y)) - run_ref(ref, x, t, y)).max()
    print(f"official-reference parity max abs err {err:.2e}")
    assert err <= 1e-4
    original = state_dict_np(ref)
    for name in ("back.safetensors", "back.pt"):
        conv.convert(str(tmp_path / "w"), str(tmp_path / name), to="dit")
        back = read_state_dict(tmp_path / name)
        assert sorted(back) == sorted(original)
        for k, v in original.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # the written .pt loads strictly into the official class
    fresh = randomized_reference(TINY, seed=9)
    fresh.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), strict=True)
    np.testing.assert_array_equal(run_ref(fresh, x, t, y), run_ref(ref, x, t, y))


def test_training_checkpoint_entries(tmp_path):
    ema, raw = randomized_reference(TINY, seed=1), randomized_reference(TINY, seed=2)
    ckpt = {
        "model": raw.state_dict(),
        "ema": ema.state_dict(),
        "opt": torch.optim.AdamW(raw.parameters()).state_dict(),
        "args": argparse.Namespace(model="DiT-S/2"),
    }
    torch.save(ckpt, tmp_path / "0400000.pt")
    x, t, y = inputs(TINY)
    for entry, source in ((None, ema), ("model", raw)):
        opts = dict(HEADS, **({"entry": entry} if entry else {}))
        dst = tmp_path / f"w_{entry}"
        conv.convert(str(tmp_path / "0400000.pt"), str(dst), **opts)
        np.testing.assert_allclose(
            np.asarray(dit_model.load(str(dst))(x, t, y)), run_ref(source, x, t, y), atol=1e-4
        )
    with pytest.raises(ValueError, match="model, ema, opt, args"):
        conv.convert(str(tmp_path / "0400000.pt"), str(tmp_path / "w_bad"), entry="nope", **HEADS)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing \(1\): blocks\.1\.mlp\.fc2\.bias"),
        (
            lambda sd: sd.__setitem__("blocks.0.extra.weight", np.zeros(3, np.float32)),
            r"unexpected \(1\): blocks\.0\.extra\.weight",
        ),
        (
            lambda sd: sd.__setitem__("blocks.1.attn.qkv.weight", np.zeros((192, 63), np.float32)),
            r"mis-shaped \(1\): blocks\.1\.attn\.qkv\.weight \(weights \(192, 63\), model \(192, 64\)\)",
        ),
        (lambda sd: sd.pop("pos_embed"), r"(?s)cannot infer the DiT size.*missing \(1\): pos_embed"),
    ],
)
def test_official_key_errors_are_named_and_nothing_is_written(official, tmp_path, edit, match):
    sd = state_dict_np(official[0])
    edit(sd)
    src = tmp_path / "bad.safetensors"
    from eqvae_jax.convert.torch_files import write_safetensors

    write_safetensors(src, sd)
    with pytest.raises(KeyMismatchError, match=match):
        conv.convert(str(src), str(tmp_path / "w"), **HEADS)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]  # atomic: no dst, no temporary left


def test_existing_dst_overwrite_and_options(official, tmp_path):
    _, pt = official
    (tmp_path / "w").mkdir()
    with pytest.raises(FileExistsError):
        conv.convert(pt, str(tmp_path / "w"), **HEADS)
    conv.convert(pt, str(tmp_path / "w"), overwrite=True, **HEADS)
    assert read_config(tmp_path / "w")[0] == "dit"
    with pytest.raises(ValueError, match="not a reference DiT size"):
        conv.convert(pt, str(tmp_path / "w2"))
    with pytest.raises(ValueError, match="unknown --extra option.*heads for --kind dit"):
        conv.convert(pt, str(tmp_path / "w2"), heads="2")
    with pytest.raises(ValueError, match=r"\.safetensors or \.pt"):
        conv.convert(str(tmp_path / "w"), str(tmp_path / "out.npz"), to="dit")
    with pytest.raises(ValueError, match="not 'diffusers'"):
        conv.convert(pt, str(tmp_path / "w3"), to="diffusers")


def test_shifted_model_needs_permission_to_write_official_layout(tmp_path):
    diffusers_model().save_pretrained(tmp_path / "hf")
    conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="timestep_freq_shift=1"):
        conv.convert(str(tmp_path / "w"), str(tmp_path / "o.safetensors"), to="dit")
    assert not os.path.exists(tmp_path / "o.safetensors")
    conv.convert(str(tmp_path / "w"), str(tmp_path / "o.safetensors"), to="dit", allow_timestep_shift="1")
    assert "blocks.1.attn.qkv.weight" in read_state_dict(tmp_path / "o.safetensors")


def test_cli(official, tmp_path, capsys):
    _, pt = official
    assert cli(["--kind", "dit", "--src", pt, "--dst", str(tmp_path / "w"), "--extra", "num_heads=2"]) == 0
    assert "DiT (depth 2" in capsys.readouterr().out
    assert cli(["--kind", "dit", "--src", pt, "--dst", str(tmp_path / "w"), "--extra", "num_heads=2"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (
        cli(["--kind", "dit", "--src", str(tmp_path / "w"), "--dst", str(tmp_path / "o.pt"), "--to", "dit"])
        == 0
    )
    assert cli(["--kind", "dit", "--src", pt, "--dst", str(tmp_path / "x"), "--to", "taming"]) == 2
