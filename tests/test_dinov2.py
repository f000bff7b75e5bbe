"""DINOv2: parity with transformers' torch `Dinov2Model` / `Dinov2WithRegistersModel` (random weights), the
torch-hub and transformers layouts giving identical weights, both export directions, position-embedding
resampling against timm's formula, presets, bf16, and every conversion error path."""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from timm_pos_embed import resample_abs_pos_embed
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from eqvae_jax.convert import dinov2 as conv
from eqvae_jax.convert.__main__ import main as cli
from eqvae_jax.convert.torch_files import read_state_dict
from eqvae_jax.models import dinov2
from eqvae_jax.models.variables import Frozen
from eqvae_jax.models.weights import KeyMismatchError, flat_variables, load_weights, read_config

TOL = 1e-4
TINY_HEADS = {"num_heads": "4"}  # hidden 64 is not a reference size


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (LayerNorm near 1, LayerScale near 1): nothing is left at a value that hides bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("lambda1") or ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("weight"):  # linear and patch-conv weights
                p.copy_(noise * 0.5 / np.sqrt(p[0].numel()))
            else:  # biases, class / mask / register tokens, position embeddings
                p.copy_(0.2 * noise)
    return model.eval()


def hf_tiny(seed: int = 0) -> Dinov2Model:
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=70, patch_size=14)
    return randomize(Dinov2Model(cfg), seed)


def hf_tiny_swiglu_registers(seed: int = 1) -> Dinov2WithRegistersModel:
    cfg = Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=98,
                                    patch_size=14, use_swiglu_ffn=True, num_register_tokens=4)
    return randomize(Dinov2WithRegistersModel(cfg), seed)


def hub_from_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The torch-hub state dict of the same weights, written independently of the converter."""
    rename = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
              "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    block = [("attention.output.dense", "attn.proj"), ("layer_scale1.lambda1", "ls1.gamma"),
             ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.weights_in", "mlp.w12"), ("mlp.weights_out", "mlp.w3")]
    out, layers = {}, set()
    for key, value in sd.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)
        if m is None:
            out[rename[key]] = value
            continue
        i, rest = m.groups()
        layers.add(i)
        if rest.startswith("attention.attention."):
            continue
        for old, new in block:
            rest = rest.replace(old, new)
        out[f"blocks.{i}.{rest}"] = value
    for i in layers:
        for leaf in ("weight", "bias"):
            parts = [sd[f"encoder.layer.{i}.attention.attention.{p}.{leaf}"] for p in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
    return out


def hf_files(model: torch.nn.Module, path) -> dict[str, np.ndarray]:
    model.save_pretrained(path)
    return load_file(os.path.join(path, "model.safetensors"))


def run_hf(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()


def images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


def max_err(out: dict, ref: np.ndarray, registers: int = 0) -> float:
    errs = [np.abs(np.asarray(out["x_norm_clstoken"]) - ref[:, 0]).max(),
            np.abs(np.asarray(out["x_norm_patchtokens"]) - ref[:, 1 + registers:]).max()]
    if registers:
        errs.append(np.abs(np.asarray(out["x_norm_regtokens"]) - ref[:, 1:1 + registers]).max())
    return float(max(errs))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    ref = hf_tiny()
    sd = hf_files(ref, root / "hf")
    summary = conv.convert(str(root / "hf"), str(root / "w"))
    return dict(root=root, ref=ref, sd=sd, summary=summary, w=str(root / "w"))


# ---------------------------------------------------------------------------------------------------- parity


def test_tiny_parity_native_and_resampled_grid(tiny):
    assert "depth 2, heads 4, mlp 256, patch 14, position grid 5x5, resampled antialias" in tiny["summary"]
    assert "pos_interpolation=bicubic to match it" in tiny["summary"]
    model = dinov2.load(tiny["w"])
    x = images(2, 70, 70)
    ref = run_hf(tiny["ref"], x)
    out = model(x)
    assert out["x_norm_patchtokens"].shape == (2, 25, 64) and out["x_norm_clstoken"].shape == (2, 64)
    assert "x_norm_regtokens" not in out
    err = max_err(out, ref)
    print(f"tiny DINOv2 vs transformers Dinov2Model, native 5x5 grid: max abs err {err:.2e}")
    assert err <= TOL and np.abs(ref).max() > 0.5
    # a non-square grid: transformers' Dinov2Model resamples with plain bicubic (our "bicubic" mode)
    x = images(2, 42, 84, seed=1)
    ref = run_hf(tiny["ref"], x)
    err = max_err(dinov2.load(tiny["w"], pos_interpolation="bicubic")(x), ref)
    print(f"tiny DINOv2 vs Dinov2Model, 3x6 grid resampled (bicubic): max abs err {err:.2e}")
    assert err <= TOL
    assert max_err(model(x), ref) > 1e-3  # the default (antialias) is a different resampling


def test_swiglu_registers_parity_and_antialias_resampling(tmp_path):
    ref = hf_tiny_swiglu_registers()
    hf_files(ref, tmp_path / "hf")
    summary = conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"), num_heads="3")
    assert "swiglu 128" in summary and "4 registers" in summary  # (int(192 * 2/3) + 7) // 8 * 8
    model = dinov2.load(str(tmp_path / "w"))
    for size, what in ((98, "native 7x7"), (42, "3x3 resampled (antialias)")):
        x = images(2, size, size, seed=size)
        out = jax.jit(lambda a: model(a))(x)
        assert out["x_norm_regtokens"].shape == (2, 4, 48)
        err = max_err(out, run_hf(ref, x), registers=4)
        print(f"SwiGLU + 4 registers vs Dinov2WithRegistersModel, {what} grid: max abs err {err:.2e}")
        assert err <= TOL


def test_vitb14_width_parity_at_224_through_hub_layout(tmp_path):
    """ViT-B/14 width and heads (2 of its 12 blocks) at 224 px, native 16x16 grid, loaded from a torch-hub
    layout .pth (head count inferred from the reference size)."""
    cfg = Dinov2Config(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, image_size=224)
    ref = randomize(Dinov2Model(cfg), seed=3)
    hub = hub_from_hf(hf_files(ref, tmp_path / "hf"))
    torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, tmp_path / "dinov2_vitb14_pretrain.pth")
    summary = conv.convert(str(tmp_path / "dinov2_vitb14_pretrain.pth"), str(tmp_path / "w"))
    assert "heads 12" in summary and "position grid 16x16" in summary
    x = images(2, 224, 224, seed=5)
    out = dinov2.load(str(tmp_path / "w"))(x)
    assert out["x_norm_patchtokens"].shape == (2, 256, 768)
    err = max_err(out, run_hf(ref, x))
    print(f"ViT-B/14-width (2 blocks) at 224 px vs Dinov2Model: max abs err {err:.2e}")
    assert err <= TOL


def test_pos_embed_resampling_matches_timm():
    """37x37 -> 16x16 is DINOv2-B/14 pretraining (518 px) -> REPA's 224 px inputs."""
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + 37 * 37, 768)).astype(np.float32)
    for grid in ((16, 16), (32, 32), (48, 48), (12, 20)):
        want = resample_abs_pos_embed(torch.from_numpy(pos), list(grid)).numpy()
        got = np.asarray(dinov2.resample_pos_embed(pos, grid))
        err = np.abs(got - want).max()
        print(f"pos_embed 37x37 -> {grid[0]}x{grid[1]} vs timm resample_abs_pos_embed: max abs err {err:.2e}")
        assert got.shape == want.shape and err <= 1e-5
        np.testing.assert_array_equal(got[:, 0], pos[:, 0])
    assert dinov2.resample_pos_embed(pos, (37, 37)) is pos
    with pytest.raises(ValueError, match="not a square grid"):
        dinov2.resample_pos_embed(pos[:, :-1], (16, 16))


# ------------------------------------------------------------------------------------------ layouts, export


def test_hub_and_hf_layouts_give_bit_identical_weights(tiny, tmp_path):
    for name, ref, heads in (("mlp", tiny["ref"], "4"), ("swiglu_reg", hf_tiny_swiglu_registers(), "3")):
        hf_sd = hf_files(ref, tmp_path / f"hf_{name}")
        conv.convert(str(tmp_path / f"hf_{name}"), str(tmp_path / f"from_hf_{name}"), num_heads=heads)
        hub = hub_from_hf(hf_sd)
        torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, tmp_path / f"{name}.pth")
        save_file(hub, str(tmp_path / f"{name}.safetensors"))
        from_hf = load_weights(tmp_path / f"from_hf_{name}")
        for src in (f"{name}.pth", f"{name}.safetensors"):
            conv.convert(str(tmp_path / src), str(tmp_path / f"w_{src}"), num_heads=heads)
            other = load_weights(tmp_path / f"w_{src}")
            assert other[1] == from_hf[1]
            assert other[2].keys() == from_hf[2].keys()
            assert all(np.array_equal(other[2][k], from_hf[2][k]) for k in other[2]), src


def test_export_to_hub_and_hf_round_trips_exactly(tiny, tmp_path):
    hub = hub_from_hf(tiny["sd"])
    for name in ("back.pth", "back.safetensors"):
        conv.convert(tiny["w"], str(tmp_path / name), to="hub")
        back = read_state_dict(tmp_path / name)
        assert back.keys() == hub.keys()
        assert all(np.array_equal(back[k], hub[k]) for k in hub), name
    summary = conv.convert(tiny["w"], str(tmp_path / "hf_back"), to="hf")
    assert "Dinov2Model" in summary
    back = load_file(str(tmp_path / "hf_back" / "model.safetensors"))
    assert back.keys() == tiny["sd"].keys()
    assert all(np.array_equal(back[k], tiny["sd"][k]) for k in back)
    reloaded = Dinov2Model.from_pretrained(str(tmp_path / "hf_back")).eval()
    x = images(1, 70, 70, seed=4)
    np.testing.assert_array_equal(run_hf(reloaded, x), run_hf(tiny["ref"], x))


# ----------------------------------------------------------------------------------------- model properties


def test_frozen_presets_and_flops():
    cfg = dinov2.preset("vitb14")
    model = dinov2.abstract(cfg)
    assert not nnx.state(model, nnx.Param)
    assert all(isinstance(v, Frozen) for _, v in nnx.to_flat_state(nnx.state(model)))
    # the hub ViT-B/14 (518 px) has the parameter count of transformers' dinov2-base config
    with torch.device("meta"):
        hf = Dinov2Model(Dinov2Config(image_size=518))
    n_ours = sum(int(np.prod(shape)) for shape in conv.hub_shapes(cfg).values())
    assert n_ours == sum(p.numel() for p in hf.parameters()) == 86_580_480
    g = dinov2.preset("vitg14_reg")
    assert (g.hidden_size, g.depth, g.num_heads, g.mlp_hidden, g.num_register_tokens) == (1536, 40, 24, 4096, 4)
    with torch.device("meta"):
        hf_g = Dinov2Model(Dinov2Config(hidden_size=1536, num_hidden_layers=1, num_attention_heads=24,
                                        use_swiglu_ffn=True))
    assert hf_g.encoder.layer[0].mlp.gate_proj.weight.shape == (g.mlp_hidden, 1536)
    assert sorted(dinov2.PRESETS) == sorted(f"vit{s}14{r}" for s in "sblg" for r in ("", "_reg"))
    with pytest.raises(ValueError, match="unknown DINOv2 preset"):
        dinov2.preset("vith14")
    # 257 tokens: 12 x (257 x 12 x 768^2 + 2 x 257^2 x 768) + patch embedding, in multiply-accumulates
    assert dinov2.dinov2_flops(cfg, 224) / 2 == pytest.approx(23.2e9, rel=2e-3)


def test_bf16_compute(tiny):
    fp32 = dinov2.load(tiny["w"])
    bf16 = dinov2.load(tiny["w"], compute_dtype="bfloat16")
    assert all(v.dtype == np.float32 for v in flat_variables(bf16).values())
    x = images(2, 70, 70)
    a, b = fp32(x)["x_norm_patchtokens"], bf16(x)["x_norm_patchtokens"]
    assert b.dtype == np.float32
    rel = float(np.abs(np.asarray(b) - np.asarray(a)).max() / np.abs(np.asarray(a)).max())
    assert 1e-5 < rel < 5e-2, rel
    with pytest.raises(ValueError, match="can only override"):
        dinov2.load(tiny["w"], depth=1)


def test_save_build_and_input_checks(tiny, tmp_path):
    model = dinov2.build(dinov2.DINOv2Config(hidden_size=32, depth=1, num_heads=2, pos_grid=2), seed=3)
    dinov2.save(model, tmp_path / "w")
    again = dinov2.load(tmp_path / "w")
    x = images(1, 28, 28)
    np.testing.assert_array_equal(np.asarray(again(x)["x_norm_clstoken"]), np.asarray(model(x)["x_norm_clstoken"]))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(images(1, 30, 28))
    with pytest.raises(ValueError, match="NHWC"):
        model(images(1, 28, 28)[..., :2])


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("blocks.1.ls2.gamma"), r"missing \(1\): blocks\.1\.ls2\.gamma"),
    (lambda sd: sd.__setitem__("head.weight", np.zeros((2, 64), np.float32)), r"unexpected \(1\): head\.weight"),
    (lambda sd: sd.__setitem__("blocks.0.attn.qkv.weight", np.zeros((192, 63), np.float32)),
     r"mis-shaped \(1\): blocks\.0\.attn\.qkv\.weight \(weights \(192, 63\), model \(192, 64\)\)"),
    (lambda sd: sd.pop("pos_embed"), r"(?s)cannot infer the DINOv2 size.*missing \(1\): pos_embed"),
])
def test_hub_key_errors_are_named_and_nothing_is_written(tiny, tmp_path, edit, match):
    hub = hub_from_hf(tiny["sd"])
    edit(hub)
    save_file(hub, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyMismatchError, match=match):
        conv.convert(str(tmp_path / "bad.safetensors"), str(tmp_path / "w"), **TINY_HEADS)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_hf_errors(tiny, tmp_path):
    os.makedirs(tmp_path / "hf")
    sd = dict(tiny["sd"])
    del sd["encoder.layer.1.attention.attention.key.bias"]
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    config = json.loads((tiny["root"] / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyMismatchError, match=r"missing \(1\): encoder\.layer\.1\.attention\.attention\.key\.bias"):
        conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit'"):
        conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        conv.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_options_destination_and_cli(tiny, tmp_path, capsys):
    save_file(hub_from_hf(tiny["sd"]), str(tmp_path / "hub.safetensors"))
    src = str(tmp_path / "hub.safetensors")
    with pytest.raises(ValueError, match="not a DINOv2 reference size"):
        conv.convert(src, str(tmp_path / "w"))
    with pytest.raises(ValueError, match="pos_interpolation must be one of"):
        conv.convert(src, str(tmp_path / "w"), pos_interpolation="nearest", **TINY_HEADS)
    conv.convert(src, str(tmp_path / "w"), pos_interpolation="bicubic", compute_dtype="bfloat16", **TINY_HEADS)
    assert read_config(tmp_path / "w")[1]["pos_interpolation"] == "bicubic"
    with pytest.raises(FileExistsError):
        conv.convert(src, str(tmp_path / "w"), **TINY_HEADS)
    with pytest.raises(ValueError, match=r"\.safetensors or \.pth"):
        conv.convert(tiny["w"], str(tmp_path / "x.npz"), to="hub")
    argv = ["--kind", "dinov2", "--src", src, "--dst", str(tmp_path / "w2"), "--extra", "num_heads=4"]
    assert cli(argv) == 0 and "torch-hub" in capsys.readouterr().out
    assert cli(argv) == 1 and "already exists" in capsys.readouterr().err
    assert cli(["--kind", "dinov2", "--src", src, "--dst", str(tmp_path / "w3"), "--to", "timm"]) == 2
    assert cli(["--kind", "dinov2", "--src", src, "--dst", str(tmp_path / "w3"), "--extra", "heads=4"]) == 2
