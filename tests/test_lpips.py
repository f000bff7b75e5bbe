"""LPIPS: parity with the `lpips` package (random VGG, real shipped lin heads), dropout, conversion errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eqvae_jax.convert import __main__ as convert_cli
from eqvae_jax.convert import lpips as conv
from eqvae_jax.convert.torch_files import read_state_dict, write_safetensors
from eqvae_jax.models import lpips
from eqvae_jax.models.variables import Frozen
from eqvae_jax.models.weights import KeyMismatchError, flat_variables

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference():
    """`lpips.LPIPS(net='vgg')`: a random VGG (torchvision shim) and the lin heads shipped in the package."""
    import torchvision_shim

    torchvision_shim.install()
    import lpips as lpips_ref

    torch.manual_seed(0)
    return lpips_ref.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    return x, y


def _ref_distance(ref, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        d = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
    return d.numpy().reshape(-1)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """The reference converted through the CLI from its own state dict (.pth, with scaling buffers)."""
    d = tmp_path_factory.mktemp("lpips")
    src = d / "lpips_vgg.pth"
    torch.save(reference.state_dict(), src)
    assert "scaling_layer.shift" in reference.state_dict()
    dst = d / "flax"
    assert convert_cli.main(["--kind", "lpips", "--src", str(src), "--dst", str(dst)]) == 0
    return lpips.load(dst), src


def _torchvision_sd(ref) -> dict[str, np.ndarray]:
    """The reference backbone in torchvision's `features.N` layout, plus an unused classifier key."""
    out = {}
    for key, value in ref.net.state_dict().items():
        _, index, name = key.split(".")  # sliceK.N.weight
        out[f"features.{index}.{name}"] = value.numpy()
    out["classifier.0.weight"] = np.zeros((4, 8), np.float32)
    return out


def test_parity_lpips_state_dict(converted, reference, images):
    model, _ = converted
    x, y = images
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(y)))
    want = _ref_distance(reference, x, y)
    assert got.shape == (2,)
    err = np.max(np.abs(got - want))
    print(f"lpips parity (lpips state dict) max abs err {err:.3e}, values {want}")
    assert err <= 1e-5


def test_gradient_parity_with_the_lpips_package(converted, reference, images):
    """d LPIPS / d x (what the EQ-VAE generator step back-propagates, through the VGG's max-pools)."""
    model, _ = converted
    x, y = images
    got = np.asarray(jax.grad(lambda x: jnp.sum(model(x, jnp.asarray(y))))(jnp.asarray(x)))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    reference(xt, torch.from_numpy(y).permute(0, 3, 1, 2)).sum().backward()
    want = xt.grad.permute(0, 2, 3, 1).numpy()
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"lpips gradient parity: max abs err {err:.3e} of the largest element")
    assert err <= 1e-4


def test_parity_torchvision_route_default_lin(reference, images, tmp_path):
    src = tmp_path / "vgg16.safetensors"
    write_safetensors(src, _torchvision_sd(reference))
    summary = conv.convert(str(src), str(tmp_path / "flax"))  # lin heads from the installed lpips package
    assert "classifier.0.weight" in summary
    model = lpips.load(tmp_path / "flax")
    x, y = images
    err = np.max(np.abs(np.asarray(model(jnp.asarray(x), jnp.asarray(y))) - _ref_distance(reference, x, y)))
    print(f"lpips parity (torchvision + shipped lin) max abs err {err:.3e}")
    assert err <= 1e-5


def test_explicit_lin_path_and_identity(converted, reference, images, tmp_path):
    src = tmp_path / "vgg16.safetensors"
    write_safetensors(src, _torchvision_sd(reference))
    conv.convert(str(src), str(tmp_path / "flax"), lin=conv.default_lin_path())
    a, b = flat_variables(lpips.load(tmp_path / "flax")), flat_variables(converted[0])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    x, _ = images
    assert np.allclose(np.asarray(converted[0](jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)


def test_frozen_only_no_params():
    model = lpips.build(seed=1)
    assert len(nnx.state(model, nnx.Param)) == 0
    all_vars = nnx.to_flat_state(nnx.state(model))
    assert len(all_vars) == 13 * 2 + 5
    assert all(isinstance(v, Frozen) for _, v in all_vars)


def test_dropout_switch(converted, reference, images):
    model, _ = converted
    graphdef, state = nnx.split(model)

    @jax.jit
    def dist(state, x, y, key=None):
        return nnx.merge(graphdef, state)(x, y, dropout_key=key)

    x, y = (jnp.asarray(a) for a in images)
    off = np.asarray(dist(state, x, y))
    assert np.array_equal(off, np.asarray(dist(state, x, y)))
    assert np.max(np.abs(off - _ref_distance(reference, *images))) <= 1e-5
    k1, k2 = jax.random.key(1), jax.random.key(2)
    on1, on1b, on2 = (np.asarray(dist(state, x, y, k)) for k in (k1, k1, k2))
    assert np.array_equal(on1, on1b)  # reproducible for a key
    assert not np.allclose(on1, off, rtol=1e-3) and not np.allclose(on1, on2, rtol=1e-3)


def test_dropout_is_inverted_dropout():
    """Half the elements zeroed, the rest doubled (torch's Dropout(0.5) in train mode): the mean is kept."""
    x = jnp.arange(1, 20001, dtype=jnp.float32).reshape(1, 100, 200, 1)
    y = np.asarray(lpips.dropout(x, jax.random.key(0), 0.5))
    kept = y != 0
    assert abs(kept.mean() - 0.5) < 0.02
    np.testing.assert_array_equal(y[kept], 2.0 * np.asarray(x)[kept])
    assert abs(y.mean() / float(x.mean()) - 1.0) < 0.03
    assert lpips.dropout(x, jax.random.key(0), 0.0) is x


def test_gradient_finite_on_flat_images():
    model = lpips.build()
    y = jnp.full((1, 16, 16, 3), -1.0)
    # Flat images make many all-zero relu feature vectors; the zero-distance term (a vs a) must not give NaN.
    g = jax.jit(jax.grad(lambda a: model(a, y).sum() + model(a, a + 0.0).sum()))(jnp.zeros((1, 16, 16, 3)))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_rejects_bad_input_shapes():
    model = lpips.build()
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))


# ---- conversion errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_sd(reference) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reference.state_dict().items()}


def _write(tmp_path, sd, name="src.safetensors"):
    path = tmp_path / name
    write_safetensors(path, sd)
    return str(path)


def test_missing_unexpected_misshaped_named(ref_sd, tmp_path):
    sd = dict(ref_sd)
    del sd["net.slice3.12.bias"]
    del sd["lin4.model.1.weight"], sd["lins.4.model.1.weight"]
    sd["net.slice1.99.weight"] = np.zeros((1,), np.float32)
    sd["net.slice2.7.weight"] = np.zeros((128, 64, 3, 1), np.float32)
    with pytest.raises(KeyMismatchError) as e:
        conv.convert(_write(tmp_path, sd), str(tmp_path / "out"))
    assert e.value.missing == ["lin4.model.1.weight", "net.slice3.12.bias"]
    assert e.value.unexpected == ["net.slice1.99.weight"]
    assert [m[0] for m in e.value.mismatched] == ["net.slice2.7.weight"]
    assert "net.slice2.7.weight" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_lpips_state_dict_without_lin_uses_lin_file(ref_sd, tmp_path, monkeypatch):
    sd = {k: v for k, v in ref_sd.items() if not k.startswith("lin")}
    src = _write(tmp_path, sd)
    conv.convert(src, str(tmp_path / "ok"))  # lin heads from the installed package
    lin = read_state_dict(conv.default_lin_path())
    flat = flat_variables(lpips.load(tmp_path / "ok"))
    assert np.array_equal(flat["lin2/kernel"], np.transpose(lin["lin2.model.1.weight"], (2, 3, 1, 0)))
    with pytest.raises(ValueError, match="already holds lin heads"):
        conv.convert(_write(tmp_path, ref_sd, "full.safetensors"), str(tmp_path / "x"),
                     lin=conv.default_lin_path())


def test_no_lpips_package_is_a_clear_error(reference, tmp_path, monkeypatch):
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    src = _write(tmp_path, _torchvision_sd(reference))
    with pytest.raises(FileNotFoundError, match="lin=PATH"):
        conv.convert(src, str(tmp_path / "out"))
    assert convert_cli.main(["--kind", "lpips", "--src", src, "--dst", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_layout_and_bad_scaling(ref_sd, tmp_path):
    with pytest.raises(ValueError, match="neither an lpips"):
        conv.convert(_write(tmp_path, {"encoder.conv_in.weight": np.zeros((1,), np.float32)}),
                     str(tmp_path / "a"))
    sd = dict(ref_sd)
    sd["scaling_layer.scale"] = np.ones((1, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match="scaling_layer.scale"):
        conv.convert(_write(tmp_path, sd, "b.safetensors"), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_existing_dst_and_overwrite(converted, tmp_path):
    _, src = converted
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        conv.convert(str(src), str(dst))
    assert convert_cli.main(["--kind", "lpips", "--src", str(src), "--dst", str(dst)]) == 1
    assert (dst / "keep").exists()
    assert convert_cli.main(["--kind", "lpips", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0
    assert not (dst / "keep").exists() and lpips.load(dst) is not None
    assert convert_cli.main(["--kind", "lpips", "--src", str(src), "--dst", str(dst), "--to", "lpips"]) == 2


def test_failed_write_leaves_nothing(converted, tmp_path, monkeypatch):
    _, src = converted

    def broken_save(path, *args, **kwargs):
        os.makedirs(path)
        open(os.path.join(path, "partial"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(conv, "save_weights", broken_save)
    with pytest.raises(OSError, match="disk full"):
        conv.convert(str(src), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
