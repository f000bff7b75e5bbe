"""FID Inception: parity with torch-fidelity's FeatureExtractorInceptionV3 (random weights and BatchNorm statistics,
converted through the CLI), the TF1 resize, pytorch-fid's input preprocessing (the `preprocess` option) against
torch, the sFID tap, conversion errors, build/save/load."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eqvae_jax.convert import __main__ as convert_cli
from eqvae_jax.convert import inception as conv
from eqvae_jax.eval import inception
from eqvae_jax.models.variables import Frozen
from eqvae_jax.models.weights import KeyMismatchError, flat_variables, variable_shapes

torch = pytest.importorskip("torch")
import fidelity_inception  # noqa: E402  (tests/torch_refs)

needs_fidelity = pytest.mark.skipif(
    not fidelity_inception.available(),
    reason=f"torch-fidelity reference missing at {fidelity_inception.SIDE_DIR}: {fidelity_inception.INSTALL}",
)


def random_torch_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """The FID network's state dict with random weights *and* random BatchNorm statistics (so a wrong eps, a
    swapped mean/var or scale/bias cannot hide), plus the keys the converter skips."""
    shapes = conv.key_map().torch_shapes(variable_shapes(inception.abstract()))
    g = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key == "fc.weight":
            value = g.normal(0, 1 / np.sqrt(shape[1]), shape)
        elif key.endswith("conv.weight"):
            value = g.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif key.endswith("bn.weight"):
            value = g.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = g.normal(0, 0.2, shape)
        elif key.endswith("bn.running_var"):
            value = g.uniform(0.3, 2.0, shape)
        else:
            raise AssertionError(key)
        sd[key] = value.astype(np.float32)
    sd["fc.bias"] = g.normal(0, 1, (1008,)).astype(np.float32)
    return sd


def _save_pth(sd: dict[str, np.ndarray], path, counters: bool = True) -> str:
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    if counters:
        for key in sd:
            if key.endswith("bn.running_var"):
                tensors[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    torch.save(tensors, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    sd = random_torch_state_dict(0)
    # pytorch-fid's and torch-fidelity's file names for the same weights
    pth = _save_pth(sd, d / "pt_inception-2015-12-05-6726825d.pth")
    dst = d / "flax"
    assert convert_cli.main(["--kind", "inception", "--src", pth, "--dst", str(dst)]) == 0
    return sd, pth, dst


@pytest.fixture(scope="module")
def reference(files):
    """torch-fidelity's extractor loading the same .pth (its strict load_state_dict checks every name/shape),
    with a forward hook on Mixed_6d.branch1x1 (TF's mixed_6/conv)."""
    if not fidelity_inception.available():
        pytest.skip(f"torch-fidelity reference missing at {fidelity_inception.SIDE_DIR}: {fidelity_inception.INSTALL}")
    ref = fidelity_inception.feature_extractor(files[1])
    taps = []
    ref.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: taps.append(out))
    return ref, taps


def _ref_features(reference, images: np.ndarray) -> dict[str, np.ndarray]:
    ref, taps = reference
    taps.clear()
    with torch.no_grad():
        pool, logits = ref(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    tap = taps[0].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
    return {"pool": pool.numpy(), "logits_unbiased": logits.numpy(), "spatial": tap.numpy()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@needs_fidelity
@pytest.mark.parametrize("shape", [(2, 256, 256, 3), (1, 37, 53, 3)], ids=["256", "37x53"])
def test_parity_with_torch_fidelity(files, reference, shape):
    net = inception.load(files[2])
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = {k: np.asarray(v) for k, v in net(images).items()}
    want = _ref_features(reference, images)
    assert set(got) == {"pool", "logits_unbiased", "spatial"}
    assert got["pool"].shape == (shape[0], 2048) and got["logits_unbiased"].shape == (shape[0], 1008)
    assert got["spatial"].shape == (shape[0], 17 * 17 * 7)
    errs = {k: _rel(got[k], want[k]) for k in want}
    print(f"inception parity {shape[1]}x{shape[2]} (max abs err / max abs value): "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f"; pool max {np.abs(want['pool']).max():.3g}, logits max {np.abs(want['logits_unbiased']).max():.3g}")
    assert errs["pool"] <= 1e-4 and errs["logits_unbiased"] <= 1e-4 and errs["spatial"] <= 1e-4


@needs_fidelity
@pytest.mark.parametrize("size", [(256, 256), (512, 384), (32, 40), (299, 299)])
def test_tf1_resize_matches_torch_fidelity(size):
    _, interp = fidelity_inception.load_modules()
    x = np.random.default_rng(2).integers(0, 256, (2, *size, 3)).astype(np.float32)
    want = interp.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda a: inception.resize_bilinear_tf1(a, 299))(x))
    assert got.shape == (2, 299, 299, 3)
    err = np.max(np.abs(got - want))
    print(f"TF1 resize {size} -> 299 max abs err {err:.2e} (values 0..255)")
    assert err <= 1e-4


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (32, 40), (299, 299)])
def test_pytorch_fid_preprocessing_matches_torch(size):
    """pytorch-fid's InceptionV3.forward input (zelaki/eqvae's rFID): ToTensor (/255), F.interpolate(299,
    bilinear, align_corners=False), 2 x - 1, on random images larger, smaller, non-square and equal to 299."""
    import torch.nn.functional as F

    x = np.random.default_rng(3).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    want = (2 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1).permute(0, 2, 3, 1)
    got = np.asarray(jax.jit(lambda a: inception.preprocess_pytorch_fid(a, 299))(x))
    err = np.max(np.abs(got - want.numpy()))
    print(f"pytorch-fid preprocessing {size} -> 299 max abs err {err:.2e} (values -1..1)")
    assert got.shape == (2, 299, 299, 3) and err <= 2e-6
    adm = np.asarray(inception.preprocess_adm(x, 299))
    if size != (299, 299):  # the two resizes differ (TF1: no half-pixel centres), not only the scaling
        assert np.max(np.abs(adm - got)) > 0.05


def test_network_input_follows_the_preprocess_option():
    """The same weights with preprocess='pytorch_fid' see 2 x / 255 - 1: at the network's own size (no resize)
    that is the 'adm' network fed x * 256 / 255, since (x' - 128) / 128 = 2 x / 255 - 1 for x' = 256 x / 255."""
    adm = inception.build(inception.tiny(), seed=2)
    pfid = inception.build(inception.tiny(preprocess="pytorch_fid"), seed=2)
    x = np.random.default_rng(4).integers(0, 256, (2, 75, 75, 3)).astype(np.float32)  # one compile per network
    got, want = pfid(x)["pool"], adm(x * (256 / 255))["pool"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(adm(x)["pool"]) - np.asarray(got)).max() > 1e-4  # the option changes the features
    with pytest.raises(ValueError, match="preprocess"):
        inception.InceptionConfig(preprocess="clean_fid")


def test_resize_indices_are_tf1_legacy():
    lo, hi, frac = inception.tf1_resize_indices(4, 8)  # scale 0.5, no half-pixel offset
    np.testing.assert_array_equal(lo, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(hi, [1, 1, 2, 2, 3, 3, 3, 3])  # clamped at the border
    np.testing.assert_array_equal(frac, [0, 0.5] * 4)


def test_pools_exclude_padding_and_max_branch():
    x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    avg = np.asarray(inception.avg_pool_exclude_pad(x))[0, :, :, 0]
    assert avg[0, 0] == pytest.approx((1 + 2 + 4 + 5) / 4) and avg[1, 1] == pytest.approx(5.0)
    mx = np.asarray(inception.max_pool(-x, 1, padding=1))[0, :, :, 0]
    assert mx[0, 0] == -1.0  # padding never wins, even against negative values


def test_frozen_only_and_sizes():
    net = inception.build()
    assert len(nnx.state(net, nnx.Param)) == 0
    assert all(isinstance(v, Frozen) for _, v in nnx.to_flat_state(nnx.state(net)))
    n = sum(int(np.prod(s)) for s in variable_shapes(net).values())
    assert n == 23_885_392 - 1008  # pytorch-fid's FID Inception minus the unused fc bias
    cfg = inception.tiny()
    assert (cfg.pool_features, cfg.spatial_features) == (128, 63)
    assert inception.InceptionConfig().spatial_features == 2023


def test_tiny_build_save_load_and_jit(tmp_path):
    net = inception.build(inception.tiny(), seed=3)
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    f = {k: np.asarray(v) for k, v in net(images).items()}
    assert {k: v.shape for k, v in f.items()} == {"pool": (3, 128), "logits_unbiased": (3, 1008), "spatial": (3, 63)}
    assert np.isfinite(f["pool"]).all() and np.std(f["pool"], axis=0).max() > 0
    inception.save(net, tmp_path / "w")
    loaded = inception.load(tmp_path / "w")
    a, b = flat_variables(net), flat_variables(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    graphdef, state = nnx.split(loaded)
    traced = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)  # the traced path
    np.testing.assert_allclose(np.asarray(traced["pool"]), f["pool"], rtol=1e-5, atol=1e-6)
    assert inception.load(tmp_path / "w", precision="default").config.precision == "default"


def test_rejects_bad_images():
    net = inception.build(inception.tiny())
    with pytest.raises(ValueError, match="NHWC"):
        net(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        net(np.zeros((1, 32, 32, 3), np.int32))
    with pytest.raises(ValueError, match="precision"):
        inception.InceptionConfig(precision="fast")


# ---- conversion ---------------------------------------------------------------------------------------------


def test_conversion_skips_counters_and_fc_bias(files, tmp_path):
    sd, pth, dst = files
    flat = flat_variables(inception.load(dst))
    np.testing.assert_array_equal(flat["fc/kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(flat["Mixed_6d/branch1x1/bn/var"], sd["Mixed_6d.branch1x1.bn.running_var"])
    np.testing.assert_array_equal(flat["Mixed_7c/branch3x3_2a/conv/kernel"],
                                  np.transpose(sd["Mixed_7c.branch3x3_2a.conv.weight"], (2, 3, 1, 0)))
    # torch-fidelity's file name, without num_batches_tracked (its converter saves none)
    src = _save_pth(sd, tmp_path / "weights-inception-2015-12-05-6726825d.pth", counters=False)
    summary = conv.convert(src, str(tmp_path / "b"))
    assert "fc.bias" in summary and "num_batches_tracked" not in summary
    b = flat_variables(inception.load(tmp_path / "b"))
    assert all(np.array_equal(flat[k], b[k]) for k in flat)


def test_conversion_errors_name_keys(files, tmp_path):
    sd = dict(files[0])
    del sd["Mixed_6d.branch1x1.bn.running_mean"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's ImageNet head, not the FID network
    src = _save_pth(sd, tmp_path / "bad.pth")
    with pytest.raises(KeyMismatchError) as e:
        conv.convert(src, str(tmp_path / "out"))
    assert e.value.missing == ["Mixed_6d.branch1x1.bn.running_mean"]
    assert e.value.unexpected == ["AuxLogits.fc.weight"]
    assert [m[0] for m in e.value.mismatched] == ["fc.weight"]
    assert not (tmp_path / "out").exists()
    assert convert_cli.main(["--kind", "inception", "--src", src, "--dst", str(tmp_path / "out")]) == 1


def test_existing_destination_and_target(files, tmp_path):
    _, pth, _ = files
    dst = tmp_path / "out"
    dst.mkdir()
    assert convert_cli.main(["--kind", "inception", "--src", pth, "--dst", str(dst)]) == 1
    assert os.listdir(dst) == []
    assert convert_cli.main(["--kind", "inception", "--src", pth, "--dst", str(dst), "--to", "torch"]) == 2
    assert convert_cli.main(["--kind", "inception", "--src", pth, "--dst", str(tmp_path / "x"),
                             "--extra", "lin=1"]) == 2
