"""MaskGIT conversion: v1 training checkpoints and plain state dicts, parity, bitwise round trip back to the
v1 layout, named key errors with nothing written, options and the CLI."""

import os

import numpy as np
import pytest
import torch
from maskgit_parity import TINY, inputs, reference, run_ref, state_dict_np

from eqvae_jax.convert import maskgit as conv
from eqvae_jax.convert.__main__ import main as cli
from eqvae_jax.convert.torch_files import read_state_dict, write_safetensors
from eqvae_jax.models import maskgit
from eqvae_jax.models.weights import KeyMismatchError, read_config

OPTS = {"num_classes": "10", "num_heads": "4"}  # TINY: 32 codes + 10 classes, 4 heads


def v1_checkpoint(ref: torch.nn.Module, path, ddp: bool = False) -> str:
    """What v1's `Trainer.save_network` writes, with real AdamW state after one step."""
    opt = torch.optim.AdamW(ref.parameters(), 1e-4, betas=(0.9, 0.96), weight_decay=1e-5)
    ref.train()
    tokens, labels, drop = inputs(TINY)
    ref(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(drop)).square().mean().backward()
    opt.step()
    ref.eval()
    sd = ref.state_dict()
    if ddp:
        sd = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"iter": 2500, "global_epoch": 1, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict()},
               path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = reference(TINY)
    return ref, v1_checkpoint(ref, tmp_path_factory.mktemp("ckpt") / "MaskGIT_ImageNet_256.pth")


def test_training_checkpoint_parity_and_bitwise_round_trip(checkpoint, tmp_path):
    ref, pth = checkpoint
    summary = conv.convert(pth, str(tmp_path / "w"), **OPTS)
    assert "depth 2, width 64, heads 4, MLP 96, 4x4 tokens, 32 codes, 10 classes" in summary
    kind, cfg = read_config(tmp_path / "w")
    assert kind == "maskgit" and maskgit.MaskGITConfig.from_dict(cfg) == TINY
    tokens, labels, drop = inputs(TINY, seed=4)
    want = run_ref(ref, tokens, labels, drop)
    err = np.abs(np.asarray(maskgit.load(str(tmp_path / "w"))(tokens, labels, drop)) - want).max()
    print(f"converted-checkpoint parity max abs err {err:.2e}")
    assert err <= 1e-4
    original = state_dict_np(ref)
    for name in ("back.pth", "back.safetensors"):
        conv.convert(str(tmp_path / "w"), str(tmp_path / name), to="valeoai")
        back = read_state_dict(tmp_path / name, entry="model_state_dict")
        assert sorted(back) == sorted(original)
        for k, v in original.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # what v1's --resume does with the written file
    ckpt = torch.load(tmp_path / "back.pth", weights_only=True)
    assert ckpt["iter"] == 0 and ckpt["global_epoch"] == 0
    fresh = reference(TINY, seed=7)
    fresh.load_state_dict(ckpt["model_state_dict"], strict=True)
    np.testing.assert_array_equal(run_ref(fresh, tokens, labels, drop), want)


def test_ddp_prefix_plain_state_dict_and_class_split(tmp_path):
    ref = reference(TINY, seed=2)
    pth = v1_checkpoint(ref, tmp_path / "ddp.pth", ddp=True)
    conv.convert(pth, str(tmp_path / "w"), **OPTS)
    tokens, labels, drop = inputs(TINY)
    np.testing.assert_allclose(np.asarray(maskgit.load(str(tmp_path / "w"))(tokens, labels, drop)),
                               run_ref(ref, tokens, labels, drop), atol=1e-4)
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, state_dict_np(ref))
    conv.convert(str(plain), str(tmp_path / "w2"), codebook_size="32", num_heads="4")  # classes from the rows
    assert read_config(tmp_path / "w2")[1]["num_classes"] == 10
    with pytest.raises(ValueError, match="44 rows, not .* with codebook_size -958 and num_classes 1000"):
        conv.convert(str(plain), str(tmp_path / "w3"), num_heads="4")  # default 1000 classes do not fit
    with pytest.raises(ValueError, match="does not split into 6 heads"):
        conv.convert(str(plain), str(tmp_path / "w3"), num_classes="10", num_heads="6")
    with pytest.raises(ValueError, match="codebook_size 32 and num_classes 11"):
        conv.convert(str(plain), str(tmp_path / "w3"), codebook_size="32", num_classes="11", num_heads="4")
    assert not os.path.exists(tmp_path / "w3")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("transformer.layers.1.1.fn.net.3.bias"),
         r"missing \(1\): transformer\.layers\.1\.1\.fn\.net\.3\.bias"),
        (lambda sd: sd.__setitem__("transformer.layers.0.0.fn.mha.bias_k", np.zeros(3, np.float32)),
         r"unexpected \(1\): transformer\.layers\.0\.0\.fn\.mha\.bias_k"),
        (lambda sd: sd.__setitem__("first_layer.2.weight", np.zeros((64, 63), np.float32)),
         r"mis-shaped \(1\): first_layer\.2\.weight \(weights \(64, 63\), model \(64, 64\)\)"),
        (lambda sd: sd.pop("pos_emb"), r"(?s)cannot infer the MaskGIT size.*missing \(1\): pos_emb"),
    ],
)
def test_key_errors_are_named_and_nothing_is_written(edit, match, tmp_path):
    sd = state_dict_np(reference(TINY))
    edit(sd)
    src = tmp_path / "bad.safetensors"
    write_safetensors(src, sd)
    with pytest.raises(KeyMismatchError, match=match):
        conv.convert(str(src), str(tmp_path / "w"), **OPTS)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]  # atomic: no dst, no temporary left


def test_options_destination_and_cli(checkpoint, tmp_path, capsys):
    _, pth = checkpoint
    with pytest.raises(ValueError, match="entry=NAME"):
        conv.convert(pth, str(tmp_path / "w"), entry="nope", **OPTS)
    with pytest.raises(ValueError, match="unknown --extra option.*heads for --kind maskgit"):
        conv.convert(pth, str(tmp_path / "w"), heads="4")
    with pytest.raises(ValueError, match="not 'google'"):
        conv.convert(pth, str(tmp_path / "w"), to="google")
    extra = ["--extra", "num_classes=10", "--extra", "num_heads=4"]
    assert cli(["--kind", "maskgit", "--src", pth, "--dst", str(tmp_path / "w"), *extra]) == 0
    assert "MaskGIT (depth 2" in capsys.readouterr().out
    assert cli(["--kind", "maskgit", "--src", pth, "--dst", str(tmp_path / "w"), *extra]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["--kind", "maskgit", "--src", str(tmp_path / "w"), "--dst", str(tmp_path / "o.npz"),
                "--to", "valeoai"]) == 1
    assert ".safetensors or .pt" in capsys.readouterr().err
    first = maskgit.build(maskgit.MaskGITConfig(**{**TINY.to_dict(), "class_token_first": True}))
    maskgit.save(first, tmp_path / "first")
    with pytest.raises(ValueError, match="class_token_first=True has no valeoai v1 layout"):
        conv.convert(str(tmp_path / "first"), str(tmp_path / "f.pth"), to="valeoai")
    assert not os.path.exists(tmp_path / "f.pth")
