"""`python -m eqvae_jax.convert --kind kl_vae`: diffusers and LDM inputs, both export layouts, and every error
path. Weights come from taming's LDM autoencoder (random, tiny config); the diffusers model holds the same
weights, moved by diffusers' own LDM converter, so the two input formats are built independently."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import kl_vae_refs as refs
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file, save_file

from eqvae_jax.convert import __main__ as cli
from eqvae_jax.convert import kl_vae as conv
from eqvae_jax.models import kl_vae, weights

TOL = 1e-4
CFG = kl_vae.tiny()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_KEYS = {"loss.logvar": np.zeros((), np.float32),
             "loss.discriminator.main.0.weight": np.ones((64, 3, 4, 4), np.float32),
             "loss.discriminator.main.0.bias": np.ones((64,), np.float32),
             "loss.perceptual_loss.lin0.model.1.weight": np.ones((1, 64, 1, 1), np.float32)}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Reference torch models and files: a diffusers directory and the Flax directory converted from it."""
    root = tmp_path_factory.mktemp("kl_vae_src")
    ldm = refs.random_ldm(CFG, seed=11)
    diff = refs.diffusers_from_ldm(ldm, CFG)
    diff.save_pretrained(root / "diffusers")
    summary = conv.convert(str(root / "diffusers"), str(root / "flax"))
    return dict(root=root, ldm=ldm, diff=diff, diffusers=str(root / "diffusers"), flax=str(root / "flax"),
                summary=summary)


def _flat(path: str) -> dict[str, np.ndarray]:
    return weights.load_weights(path)[2]


def _assert_same_flat(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different


def _diffusers_variant(src: dict, dst, edit) -> str:
    """A copy of the source diffusers directory with its state dict passed through `edit`."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src["diffusers"], "config.json"), dst)
    sd = load_file(os.path.join(src["diffusers"], "diffusion_pytorch_model.safetensors"))
    save_file(edit(dict(sd)), os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return str(dst)


def _no_leftovers(parent) -> None:
    assert not [n for n in os.listdir(parent) if ".tmp-" in n], os.listdir(parent)


# ---------------------------------------------------------------------------------------------- happy paths


def test_diffusers_dir_gives_a_model_matching_both_references(src):
    assert "diffusers" in src["summary"] and "124 tensors" in src["summary"]
    vae = kl_vae.load(src["flax"])
    assert vae.config == CFG
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    ref_diff, ref_ldm = refs.diffusers_outputs(src["diff"], x_nchw), refs.ldm_outputs(src["ldm"], x_nchw)
    got = refs.jax_outputs(vae, x, ref_diff[0])
    for name, ref in (("diffusers", ref_diff), ("taming LDM", ref_ldm)):
        errors = [refs.max_err(a, b) for a, b in zip(got, ref, strict=True)]
        print(f"tiny via converter vs {name}: max abs err mean/logvar/decode = {errors}")
        assert max(errors) <= TOL, (name, errors)


@pytest.mark.parametrize("variant", ["lightning_ckpt_with_loss", "prefixed_safetensors", "bare_pt"])
def test_ldm_files_give_the_same_weights_as_diffusers(src, tmp_path, variant):
    sd = {k: v.detach().clone() for k, v in src["ldm"].state_dict().items()}
    if variant == "lightning_ckpt_with_loss":
        path = tmp_path / "model.ckpt"
        full = {**sd, **{k: torch.from_numpy(v) for k, v in LOSS_KEYS.items()}}
        torch.save({"state_dict": full, "global_step": 3}, path)
    elif variant == "prefixed_safetensors":
        path = tmp_path / "sd.safetensors"
        full = {f"first_stage_model.{k}": v.numpy() for k, v in sd.items()}
        full.update({f"first_stage_model.{k}": v for k, v in LOSS_KEYS.items()})
        full["model.diffusion_model.input_blocks.0.0.weight"] = np.ones((8, 4, 3, 3), np.float32)
        full["cond_stage_model.proj.weight"] = np.ones((2, 2), np.float32)
        save_file(full, str(path))
    else:
        path = tmp_path / "vae.pt"
        torch.save(sd, path)
    summary = conv.convert(str(path), str(tmp_path / "out"), sample_size="32")  # LDM files carry no config
    _assert_same_flat(_flat(str(tmp_path / "out")), _flat(src["flax"]))
    assert weights.read_config(str(tmp_path / "out")) == ("kl_vae", CFG.to_dict())  # inferred == diffusers'
    if variant != "bare_pt":
        assert "skipped 4 loss keys" in summary
        for group in ("loss.discriminator.* (2)", "loss.logvar (1)", "loss.perceptual_loss.* (1)"):
            assert group in summary
    if variant == "prefixed_safetensors":
        assert "ignored 2 keys outside first_stage_model.*" in summary


def test_flax_to_diffusers_to_flax_is_exact(src, tmp_path):
    conv.convert(src["flax"], str(tmp_path / "d"), to="diffusers")
    model, info = AutoencoderKL.from_pretrained(str(tmp_path / "d"), output_loading_info=True)
    problems = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    assert not any(info[k] for k in problems), info
    ref = src["diff"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert model.config.scaling_factor == CFG.scaling_factor and model.config.shift_factor is None
    conv.convert(str(tmp_path / "d"), str(tmp_path / "f"))
    _assert_same_flat(_flat(str(tmp_path / "f")), _flat(src["flax"]))
    assert weights.read_config(str(tmp_path / "f")) == weights.read_config(src["flax"])


def test_flax_to_ldm_to_flax_is_exact(src, tmp_path):
    out = tmp_path / "ldm.safetensors"
    conv.convert(src["flax"], str(out), to="ldm")
    sd = load_file(str(out))
    assert sd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # LDM stores attention as 1x1 convs
    model = refs.LDMAutoencoderKL(CFG)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    ref = src["ldm"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    conv.convert(str(out), str(tmp_path / "f"), sample_size="32")
    _assert_same_flat(_flat(str(tmp_path / "f")), _flat(src["flax"]))


def test_sd3_style_ldm_without_quant_convs(tmp_path):
    cfg = kl_vae.tiny(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    ldm = refs.random_ldm(cfg, seed=3)
    save_file(refs.numpy_state_dict(ldm), str(tmp_path / "sd3.safetensors"))
    conv.convert(str(tmp_path / "sd3.safetensors"), str(tmp_path / "a"),
                 scaling_factor="1.5305", shift_factor="0.0609")
    _, config, flat = weights.load_weights(str(tmp_path / "a"))
    assert config["latent_channels"] == 16
    assert not config["use_quant_conv"] and not config["use_post_quant_conv"]
    assert (config["scaling_factor"], config["shift_factor"]) == (1.5305, 0.0609)
    refs.diffusers_from_ldm(ldm, cfg).save_pretrained(tmp_path / "d")  # independent key map
    conv.convert(str(tmp_path / "d"), str(tmp_path / "b"))
    _assert_same_flat(flat, _flat(str(tmp_path / "b")))
    assert kl_vae.load(str(tmp_path / "b")).config.shift_factor == 0.0  # diffusers config written with None


def test_legacy_diffusers_attention_names_and_conv_shapes(src, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def edit(sd):
        out = {}
        for k, v in sd.items():
            for new, old in legacy.items():
                if f".attentions.0.{new}." in k:
                    k, v = k.replace(f".{new}.", f".{old}."), (v[:, :, None, None] if v.ndim == 2 else v)
            out[k] = v
        return out

    d = _diffusers_variant(src, tmp_path / "legacy", edit)
    written = load_file(f"{d}/diffusion_pytorch_model.safetensors")
    assert written["encoder.mid_block.attentions.0.query.weight"].shape == (64, 64, 1, 1)
    conv.convert(d, str(tmp_path / "f"))
    _assert_same_flat(_flat(str(tmp_path / "f")), _flat(src["flax"]))


def test_pipeline_root_with_vae_subfolder(src, tmp_path):
    shutil.copytree(src["diffusers"], tmp_path / "pipe" / "vae")
    conv.convert(str(tmp_path / "pipe"), str(tmp_path / "f"))
    _assert_same_flat(_flat(str(tmp_path / "f")), _flat(src["flax"]))


def test_cli_main_and_preset_option(src, tmp_path, capsys):
    out = tmp_path / "ldm.safetensors"
    assert cli.main(["--kind", "kl_vae", "--src", src["flax"], "--dst", str(out), "--to", "ldm"]) == 0
    assert "-> ldm" in capsys.readouterr().out
    argv = ["--kind", "kl_vae", "--src", str(out), "--dst", str(tmp_path / "f"), "--extra", "preset=tiny"]
    assert cli.main(argv) == 0
    assert weights.read_config(str(tmp_path / "f"))[1] == CFG.to_dict()


# ---------------------------------------------------------------------------------------------- errors


def test_missing_unexpected_and_misshaped_keys_are_named(src, tmp_path):
    def edit(sd):
        del sd["decoder.up_blocks.1.resnets.1.norm2.bias"]
        sd["encoder.extra_block.weight"] = np.zeros((3,), np.float32)
        sd["decoder.conv_out.bias"] = np.zeros((4,), np.float32)
        return sd

    d = _diffusers_variant(src, tmp_path / "bad", edit)
    with pytest.raises(weights.KeyMismatchError) as e:
        conv.convert(d, str(tmp_path / "f"))
    assert e.value.missing == ["decoder.up_blocks.1.resnets.1.norm2.bias"]
    assert e.value.unexpected == ["encoder.extra_block.weight"]
    assert e.value.mismatched == [("decoder.conv_out.bias", (4,), (3,))]
    for name in ("decoder.up_blocks.1.resnets.1.norm2.bias", "encoder.extra_block.weight", "(4,)"):
        assert name in str(e.value)
    assert not os.path.exists(tmp_path / "f")
    _no_leftovers(tmp_path)


def test_ldm_errors_name_keys_and_wrong_extra_shapes(src, tmp_path):
    sd = refs.numpy_state_dict(src["ldm"])
    del sd["decoder.up.0.block.1.conv2.bias"]
    sd["encoder.down.0.attn.0.q.weight"] = np.zeros((32, 32, 1, 1), np.float32)  # level attention
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.KeyMismatchError) as e:
        conv.convert(str(tmp_path / "bad.safetensors"), str(tmp_path / "f"))
    assert e.value.missing == ["decoder.up.0.block.1.conv2.bias"]
    assert e.value.unexpected == ["encoder.down.0.attn.0.q.weight"]
    good = tmp_path / "good.safetensors"
    save_file(refs.numpy_state_dict(src["ldm"]), str(good))
    with pytest.raises(weights.KeyMismatchError, match="decoder.conv_in.weight"):
        conv.convert(str(good), str(tmp_path / "f"), latent_channels="8")
    with pytest.raises(ValueError, match="unknown --extra option"):
        conv.convert(str(good), str(tmp_path / "f"), latent_chanels="8")
    with pytest.raises(ValueError, match="unknown preset"):
        conv.convert(str(good), str(tmp_path / "f"), preset="sd4_vae")
    save_file({"loss.logvar": np.zeros((), np.float32)}, str(tmp_path / "only_loss.safetensors"))
    with pytest.raises(weights.KeyMismatchError, match="encoder.conv_in.weight"):
        conv.convert(str(tmp_path / "only_loss.safetensors"), str(tmp_path / "f"))
    assert not os.path.exists(tmp_path / "f")
    _no_leftovers(tmp_path)


def _flax_dir_of_kind(path, kind: str) -> str:
    weights.save_weights(path, kind, {"a": 1}, {"w": np.zeros((2,), np.float32)})
    return str(path)


def test_wrong_kind_or_format(src, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    vq = tmp_path / "vq"
    vq.mkdir()
    (vq / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    gelu = tmp_path / "gelu"
    gelu.mkdir()
    with open(os.path.join(src["diffusers"], "config.json")) as f:
        config = json.load(f)
    (gelu / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    lpips_dir = _flax_dir_of_kind(tmp_path / "lpips", "lpips")
    ldm_file = tmp_path / "ldm.safetensors"
    save_file(refs.numpy_state_dict(src["ldm"]), str(ldm_file))
    cases = [
        (dict(src=str(tmp_path / "notes.txt")), ValueError, "unknown weights file format"),
        (dict(src=str(tmp_path / "empty")), ValueError, "neither"),
        (dict(src=str(tmp_path / "missing")), FileNotFoundError, "does not exist"),
        (dict(src=str(vq)), ValueError, "'VQModel', not an 'AutoencoderKL'"),
        (dict(src=str(gelu)), ValueError, "act_fn='gelu'"),
        (dict(src=lpips_dir, to="diffusers"), ValueError, "holds a 'lpips' model"),
        (dict(src=src["flax"]), ValueError, "already an eqvae-jax weights directory"),
        (dict(src=str(ldm_file), to="diffusers"), ValueError, "needs an eqvae-jax weights directory"),
        (dict(src=src["flax"], to="ldm"), ValueError, "must end with .safetensors"),
        (dict(src=src["flax"], to="onnx"), ValueError, "--to one of"),
        (dict(src=src["diffusers"], scaling_factor="1"), ValueError, "only apply to an LDM"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            conv.convert(dst=str(tmp_path / "out"), **kwargs)
        assert not os.path.exists(tmp_path / "out"), kwargs
    empty_vae = tmp_path / "noweights"
    empty_vae.mkdir()
    shutil.copy(os.path.join(src["diffusers"], "config.json"), empty_vae)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        conv.convert(str(empty_vae), str(tmp_path / "out"))
    argv = ["--kind", "kl_vae", "--src", src["flax"], "--dst", str(tmp_path / "o"), "--to", "onnx"]
    assert cli.main(argv) == 2
    _no_leftovers(tmp_path)


def test_existing_dst_needs_overwrite(src, tmp_path, capsys):
    dst = tmp_path / "f"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        conv.convert(src["diffusers"], str(dst))
    assert (dst / "keep.txt").read_text() == "old"
    assert cli.main(["--kind", "kl_vae", "--src", src["diffusers"], "--dst", str(dst)]) == 1
    assert "already exists" in capsys.readouterr().err
    conv.convert(src["diffusers"], str(dst), overwrite=True)
    assert not (dst / "keep.txt").exists()
    _assert_same_flat(_flat(str(dst)), _flat(src["flax"]))
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("to", ["flax", "diffusers", "ldm"])
def test_failure_while_writing_leaves_nothing_behind(src, tmp_path, monkeypatch, to):
    def write_half_then_fail(path, *args, **kwargs):
        if to == "flax":
            os.makedirs(path)
            path = os.path.join(path, "partial")
        with open(path, "w") as f:
            f.write("half")
        raise OSError("disk full")

    if to == "flax":
        monkeypatch.setattr(conv.weights, "save_weights", write_half_then_fail)
        args = (src["diffusers"], str(tmp_path / "out"))
    else:
        monkeypatch.setattr(conv, "write_safetensors", write_half_then_fail)
        args = (src["flax"], str(tmp_path / ("out.safetensors" if to == "ldm" else "out")))
    with pytest.raises(OSError, match="disk full"):
        conv.convert(*args, to=to)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_safetensors_inputs_work_with_torch_blocked(src, tmp_path):
    ldm_file = tmp_path / "ldm.safetensors"
    save_file(refs.numpy_state_dict(src["ldm"]), str(ldm_file))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        from eqvae_jax.convert import kl_vae as conv
        print(conv.convert({str(ldm_file)!r}, {str(tmp_path / "a")!r}, sample_size="32"))
        print(conv.convert({src["diffusers"]!r}, {str(tmp_path / "b")!r}))
        print(conv.convert({str(tmp_path / "a")!r}, {str(tmp_path / "c.safetensors")!r}, to="ldm"))
        try:
            import torch
        except ImportError:
            print("torch blocked")
    """)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("torch blocked")
    _assert_same_flat(_flat(str(tmp_path / "a")), _flat(src["flax"]))
    _assert_same_flat(_flat(str(tmp_path / "b")), _flat(src["flax"]))
