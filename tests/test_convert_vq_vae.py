"""`python -m eqvae_jax.convert --kind vq_vae`: a Lightning `last.ckpt` (optimizer states, callbacks keyed by class,
hyper-parameter objects, loss.* keys) with and without its model.yaml, the discriminator in the same file, export
back to taming's layout (loaded strictly by taming's modules), and every bad-input path (nothing written)."""

import os

import kl_vae_refs
import lightning_like
import numpy as np
import pytest
import torch
import vq_refs as refs
import yaml
from safetensors.numpy import load_file, save_file
from taming.modules.discriminator.model import NLayerDiscriminator

from eqvae_jax.convert import __main__ as cli
from eqvae_jax.convert import discriminator as disc_conv
from eqvae_jax.convert import kl_vae as kl_conv
from eqvae_jax.convert import vq_vae as conv
from eqvae_jax.models import discriminator as disc_model
from eqvae_jax.models import kl_vae, vq_vae, weights

CFG = vq_vae.tiny()
D_CFG = dict(ndf=8, n_layers=1)


def _taming_yaml(cfg: vq_vae.VQVAEConfig, **edits) -> dict:
    """A config in taming's layout (as in configs/imagenet_vqgan.yaml), with `edits` to ddconfig/params."""
    params = {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": refs.ddconfig(cfg),
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                             "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 250001,
                                        "disc_weight": 0.8, "codebook_weight": 1.0}}}
    for k, v in edits.items():
        (params["ddconfig"] if k in params["ddconfig"] or k == "give_pre_end" else params)[k] = v
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel", "params": params}}


def _write_yaml(path, doc) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A taming VQModel + discriminator saved as Lightning's last.ckpt (with extras) beside its model.yaml."""
    root = tmp_path_factory.mktemp("vq_src")
    ref = refs.random_taming(CFG, seed=2, codebook_std=0.3)
    torch.manual_seed(4)
    disc = NLayerDiscriminator(input_nc=3, **D_CFG)
    sd = {**ref.state_dict(), **{f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()},
          "loss.perceptual_loss.lin0.model.1.weight": torch.ones(1, 64, 1, 1)}
    (root / "run").mkdir()
    lightning_like.lightning_checkpoint(sd, root / "run" / "last.ckpt")
    _write_yaml(root / "run" / "model.yaml", _taming_yaml(CFG))
    lightning_like.CALLS.clear()
    summary = conv.convert(str(root / "run" / "last.ckpt"), str(root / "flax"))
    return dict(root=root, ref=ref, disc=disc, ckpt=str(root / "run" / "last.ckpt"), flax=str(root / "flax"),
                summary=summary, sd={k: v.numpy() for k, v in ref.state_dict().items()})


def _flat(path: str) -> dict[str, np.ndarray]:
    return weights.load_weights(path)[2]


def _same_flat(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not np.array_equal(a[k], b[k])]


def _no_leftovers(parent) -> None:
    assert not [n for n in os.listdir(parent) if ".tmp-" in n], os.listdir(parent)


# ---------------------------------------------------------------------------------------------- happy paths


def test_lightning_ckpt_with_yaml(src):
    s = src["summary"]
    print(s)
    assert "architecture from" in s and "model.yaml" in s and "64 codes" in s
    assert "skipped 11 loss keys" in s and "loss.discriminator.* (10)" in s and "loss.perceptual_loss.* (1)" in s
    assert not lightning_like.CALLS  # no pickled code ran (stand-ins for the Lightning extras)
    vq = vq_vae.load(src["flax"])
    assert vq.config == CFG
    x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    refs.assert_parity(refs.jax_outputs(vq, x), refs.taming_outputs(src["ref"], x),
                       src["sd"]["quantize.embedding.weight"], "converted tiny")


def test_inferred_architecture_matches_the_yaml(src, tmp_path):
    plain = tmp_path / "vq.safetensors"  # no model.yaml beside it: shapes decide
    save_file(src["sd"], str(plain))
    summary = conv.convert(str(plain), str(tmp_path / "a"), resolution="32")
    assert "architecture from the weight shapes + --extra resolution" in summary
    assert weights.read_config(str(tmp_path / "a")) == ("vq_vae", CFG.to_dict())
    _same_flat(_flat(str(tmp_path / "a")), _flat(src["flax"]))
    conv.convert(str(plain), str(tmp_path / "b"))  # default resolution 256: the attention level is named 128
    cfg = vq_vae.load(str(tmp_path / "b")).config
    assert (cfg.resolution, cfg.attn_resolutions) == (256, (128,))
    assert cfg.trunk().encoder_attention() == CFG.trunk().encoder_attention()  # the same network
    conv.convert(str(plain), str(tmp_path / "c"), preset="tiny")
    assert vq_vae.load(str(tmp_path / "c")).config == CFG


def test_discriminator_of_the_same_checkpoint(src, tmp_path):
    summary = disc_conv.convert(src["ckpt"], str(tmp_path / "d"), **D_CFG)
    assert "skipped 156 keys" in summary and "decoder.conv_in.weight" in summary  # 155 VQ + 1 LPIPS
    d = disc_model.load(str(tmp_path / "d"))
    assert d.n_layers == 1
    back = disc_conv.torch_state_dict(weights.flat_variables(d), 1)
    want = src["disc"].state_dict()
    assert not [k for k in want if not np.array_equal(back[k], want[k].numpy())]


@pytest.mark.parametrize("dst", ["vq.safetensors", "vq.ckpt", "run_dir"])
def test_to_taming_loads_strictly_into_tamings_modules(src, tmp_path, dst):
    out = tmp_path / dst
    summary = conv.convert(src["flax"], str(out), to="taming")
    assert "-> taming" in summary
    if dst.endswith(".safetensors"):
        sd = {k: torch.from_numpy(v) for k, v in load_file(str(out)).items()}
    else:
        ckpt = out / "last.ckpt" if dst == "run_dir" else out
        sd = torch.load(str(ckpt), map_location="cpu", weights_only=True)["state_dict"]
    assert sd["encoder.down.1.attn.0.q.weight"].shape == (64, 64, 1, 1)  # 1x1 convs, as taming stores them
    model = refs.TamingVQModel(CFG)
    model.load_state_dict(sd, strict=True)
    assert not [k for k, v in model.state_dict().items() if not np.array_equal(v.numpy(), src["sd"][k])]
    if dst == "run_dir":  # last.ckpt + model.yaml: the layout --to flax reads back
        assert sorted(os.listdir(out)) == ["last.ckpt", "model.yaml"]
        assert conv.config_from_taming_yaml(str(out / "model.yaml")) == CFG
        conv.convert(str(out / "last.ckpt"), str(tmp_path / "back"))
        _same_flat(_flat(str(tmp_path / "back")), _flat(src["flax"]))
        assert weights.read_config(str(tmp_path / "back")) == weights.read_config(src["flax"])


def test_cli(src, tmp_path, capsys):
    argv = ["--kind", "vq_vae", "--src", src["ckpt"], "--dst", str(tmp_path / "f"), "--extra", "preset=tiny"]
    assert cli.main(argv) == 0
    assert "preset tiny" in capsys.readouterr().out
    argv = ["--kind", "vq_vae", "--src", src["flax"], "--dst", str(tmp_path / "o.ckpt"), "--to", "ldm"]
    assert cli.main(argv) == 2
    assert "--to one of flax, taming" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("legacy_format", [False, True])
def test_pickled_code_is_refused_not_run(src, tmp_path, legacy_format):
    sd = {k: torch.from_numpy(v) for k, v in src["sd"].items()}
    path = tmp_path / "last.ckpt"
    lightning_like.lightning_checkpoint(sd, path, dangerous=True, legacy_format=legacy_format)
    with pytest.raises(ValueError, match="(?s)refused.*posix.system"):
        conv.convert(str(path), str(tmp_path / "f"), preset="tiny")
    assert not os.path.exists(tmp_path / "f") and not lightning_like.CALLS
    lightning_like.lightning_checkpoint(sd, path, legacy_format=legacy_format)  # the same extras, no shell
    conv.convert(str(path), str(tmp_path / "f"), preset="tiny")
    _same_flat(_flat(str(tmp_path / "f")), _flat(src["flax"]))
    assert not lightning_like.CALLS


def test_kl_checkpoint_as_vq_and_vq_checkpoint_as_kl(src, tmp_path):
    kl = kl_vae_refs.random_ldm(kl_vae.tiny(), seed=1)
    kl_file = tmp_path / "kl.ckpt"
    torch.save({"state_dict": kl.state_dict()}, kl_file)
    with pytest.raises(ValueError, match="is a KL autoencoder.*use --kind kl_vae"):
        conv.convert(str(kl_file), str(tmp_path / "f"))
    with pytest.raises(ValueError, match="use --kind kl_vae"):  # even with an architecture given
        conv.convert(str(kl_file), str(tmp_path / "f"), preset="tiny")
    with pytest.raises(ValueError, match="is a VQ autoencoder.*use --kind vq_vae"):
        kl_conv.convert(src["ckpt"], str(tmp_path / "f"))
    vq_no_codebook = {k: v for k, v in src["sd"].items() if k != "quantize.embedding.weight"}
    save_file(vq_no_codebook, str(tmp_path / "vq.safetensors"))  # double_z=False without a codebook: neither
    with pytest.raises(ValueError, match="VQ autoencoder \\(double_z=False\\) converts with --kind vq_vae"):
        kl_conv.convert(str(tmp_path / "vq.safetensors"), str(tmp_path / "f"))
    with pytest.raises(weights.KeyMismatchError, match="quantize.embedding.weight"):
        conv.convert(str(tmp_path / "vq.safetensors"), str(tmp_path / "f"))
    assert not os.path.exists(tmp_path / "f")
    _no_leftovers(tmp_path)


def _with_yaml(src, tmp_path, doc) -> str:
    d = tmp_path / "run"
    d.mkdir()
    os.symlink(src["ckpt"], d / "last.ckpt")
    _write_yaml(d / "model.yaml", doc)
    return str(d / "last.ckpt")


@pytest.mark.parametrize("case", ["codebook_size", "channels", "levels", "double_z", "remap", "unknown_key",
                                  "gumbel"])
def test_yaml_that_disagrees_with_the_weights(src, tmp_path, case):
    edits = {"codebook_size": dict(n_embed=32), "channels": dict(z_channels=16), "levels": dict(ch_mult=[1, 2, 2]),
             "double_z": dict(double_z=True), "remap": dict(remap="used.npy"), "unknown_key": dict(use_linear=True),
             "gumbel": {}}[case]
    doc = _taming_yaml(CFG, **edits)
    if case == "gumbel":
        doc["model"]["target"] = "taming.models.vqgan.GumbelVQ"
    ckpt = _with_yaml(src, tmp_path, doc)
    expected = {"codebook_size": (ValueError, "codebook size mismatch: the weights hold 64 codes.*n_embed=32"),
                "channels": (weights.KeyMismatchError, "(?s)model.yaml.*mis-shaped.*decoder.conv_in.weight"),
                "levels": (weights.KeyMismatchError, "(?s)model.yaml.*missing .*encoder.down.2.block.0"),
                "double_z": (ValueError, "double_z is true"),
                "remap": (ValueError, "remap='used.npy'"),
                "unknown_key": (ValueError, "unknown model.params keys \\['use_linear'\\]"),
                "gumbel": (ValueError, "'taming.models.vqgan.GumbelVQ'")}[case]
    with pytest.raises(expected[0], match=expected[1]):
        conv.convert(ckpt, str(tmp_path / "f"))
    assert not os.path.exists(tmp_path / "f")
    _no_leftovers(tmp_path)


def test_other_errors_name_keys_and_write_nothing(src, tmp_path):
    sd = dict(src["sd"])
    del sd["decoder.up.1.attn.1.proj_out.bias"]
    sd["encoder.down.0.attn.0.q.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.KeyMismatchError) as e:
        conv.convert(str(tmp_path / "bad.safetensors"), str(tmp_path / "f"), preset="tiny")
    assert e.value.missing == ["decoder.up.1.attn.1.proj_out.bias"]
    assert e.value.unexpected == ["encoder.down.0.attn.0.q.weight"]
    good = tmp_path / "good.safetensors"
    save_file(src["sd"], str(good))
    cases = [
        (dict(src=str(good), n_embed="128"), ValueError, "codebook size mismatch.*--extra n_embed"),
        (dict(src=str(good), embed_dim="4"), ValueError, "codebook size mismatch"),
        (dict(src=str(good), preset="tiny", yaml="x.yaml"), ValueError, "exclusive"),
        (dict(src=str(good), preset="f8"), ValueError, "unknown preset"),
        (dict(src=str(good), yaml=str(tmp_path / "none.yaml")), FileNotFoundError, "none.yaml"),
        (dict(src=str(good), n_embeds="3"), ValueError, "unknown --extra option"),
        (dict(src=src["flax"]), ValueError, "already an eqvae-jax weights directory"),
        (dict(src=str(good), to="taming"), ValueError, "needs an eqvae-jax weights directory"),
        (dict(src=src["flax"], to="taming", n_embed="3"), ValueError, "only apply to a taming source"),
        (dict(src=str(tmp_path)), ValueError, "not an eqvae-jax weights directory"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            conv.convert(dst=str(tmp_path / "f"), **kwargs)
        assert not os.path.exists(tmp_path / "f"), kwargs
    weights.save_weights(tmp_path / "kl_dir", "kl_vae", {}, {"w": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="holds a 'kl_vae' model, not 'vq_vae'"):
        conv.convert(str(tmp_path / "kl_dir"), str(tmp_path / "f.ckpt"), to="taming")
    (tmp_path / "f.ckpt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        conv.convert(src["flax"], str(tmp_path / "f.ckpt"), to="taming")
    assert (tmp_path / "f.ckpt").read_text() == "old"
    _no_leftovers(tmp_path)


def test_failure_while_writing_leaves_nothing_behind(src, tmp_path, monkeypatch):
    def half_then_fail(path, *args, **kwargs):
        with open(path, "w") as f:
            f.write("half")
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_torch_checkpoint", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        conv.convert(src["flax"], str(tmp_path / "out.ckpt"), to="taming")
    assert os.listdir(tmp_path) == []


def test_torch_free_checkpoint_writer_reads_back_in_torch(tmp_path):
    """`torch_files.write_torch_checkpoint` (the training export's writer, no torch) gives what torch.save would:
    every dtype, 0-d and non-contiguous arrays, with and without the 'state_dict' wrapper, also memory-mapped."""
    from eqvae_jax.convert.torch_files import write_torch_checkpoint

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((3, 4, 2, 2)).astype(np.float32), "t": rng.standard_normal((4, 3)).T,
              "h": rng.standard_normal(5).astype(np.float16), "step": np.array(7, np.int64),
              "i": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.array([-1, 2], np.int16),
              "b": np.array([True, False]), "u": np.arange(3, dtype=np.uint8), "c": np.array([-3], np.int8)}
    write_torch_checkpoint(tmp_path / "a.ckpt", arrays)
    write_torch_checkpoint(tmp_path / "b.pt", arrays, wrap=None)
    for loaded in (torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"],
                   torch.load(tmp_path / "a.ckpt", weights_only=True, mmap=True)["state_dict"],
                   torch.load(tmp_path / "b.pt", weights_only=True)):
        assert list(loaded) == list(arrays)
        for k, v in arrays.items():
            assert loaded[k].numpy().dtype == v.dtype and loaded[k].shape == v.shape, k
            np.testing.assert_array_equal(loaded[k].numpy(), v)
    with pytest.raises(ValueError, match="c64: dtype complex64 cannot be written"):
        write_torch_checkpoint(tmp_path / "c.ckpt", {"c64": np.zeros(2, np.complex64)})
