"""PatchGAN discriminator: parity with taming's NLayerDiscriminator (train/eval BatchNorm, running stats),
per-group statistics, the pure jitted usage, sharding semantics and the taming/LDM converter."""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from eqvae_jax.convert import __main__ as convert_cli
from eqvae_jax.convert import discriminator as conv
from eqvae_jax.convert.torch_files import read_state_dict, write_safetensors
from eqvae_jax.models import discriminator as disc
from eqvae_jax.models.weights import KeyMismatchError, flat_variables

torch = pytest.importorskip("torch")
# Elementwise |ours - torch| <= TOL + TOL * |torch|. Train-mode BatchNorm divides by the batch std (~0.05
# after the N(0, 0.02) convs): fp32 summation-order noise of the convs (~3e-7) becomes ~1e-5 on logits ~4.
TOL = 1e-5


def _assert_close(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    return float(np.max(np.abs(got - want)))


@pytest.fixture(scope="module")
def ref():
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    torch.manual_seed(0)
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3).apply(weights_init)
    with torch.no_grad():  # non-trivial running stats, so eval mode really tests them
        for m in d.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return d


@pytest.fixture(scope="module")
def ref_sd(ref) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in ref.state_dict().items()}


def _ours(ref_sd, **cfg) -> disc.NLayerDiscriminator:
    model = conv.discriminator_from_ldm_state_dict({conv.LDM_PREFIX + k: v for k, v in ref_sd.items()}, **cfg)
    assert model is not None
    return model


def _x(seed: int, b: int = 4, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def _torch_forward(d, x: np.ndarray, train: bool) -> np.ndarray:
    d.train(train)
    with torch.no_grad():
        return d(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


def _torch_stats(d) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in d.state_dict().items() if "running" in k}


def _our_stats(model) -> dict[str, np.ndarray]:
    kmap = {r.flax: r.torch for r in conv.key_map(model.n_layers).rows}
    return {kmap[k]: v for k, v in flat_variables(model, nnx.BatchStat).items()}


def _max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_init_follows_weights_init():
    model = disc.NLayerDiscriminator(rngs=nnx.Rngs(0))
    flat = flat_variables(model)
    assert abs(flat["convs/1/kernel"].std() - 0.02) < 1e-3 and abs(flat["convs/1/kernel"].mean()) < 1e-3
    assert abs(flat["norms/2/scale"].mean() - 1.0) < 5e-3 and 0.01 < flat["norms/2/scale"].std() < 0.03
    assert np.all(flat["norms/0/bias"] == 0) and np.all(flat["norms/0/var"] == 1)
    assert np.abs(flat["convs/0/bias"]).max() <= 1 / np.sqrt(48) and flat["convs/0/bias"].std() > 0
    assert "convs/1/bias" not in flat


def test_parity_train_mode_and_running_stats(ref, ref_sd):
    d = copy.deepcopy(ref)
    model = _ours(ref_sd)
    x = _x(1)
    want = _torch_forward(d, x, train=True)
    got = np.asarray(model(jnp.asarray(x)))
    out_err, stat_err = _assert_close(got, want), _max_err(_our_stats(model), _torch_stats(d))
    # Against the float64 reference both fp32 implementations are within 1e-5 (absolute) on their own.
    d64 = copy.deepcopy(ref).double().train()
    with torch.no_grad():
        want64 = d64(torch.from_numpy(x).double().permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    err64, torch_err64 = float(np.max(np.abs(got - want64))), float(np.max(np.abs(want - want64)))
    print(f"discriminator train-mode max abs err: logits {out_err:.2e} vs torch fp32, "
          f"{err64:.2e} vs torch fp64 "
          f"(torch fp32 vs fp64 {torch_err64:.2e}; |logits| <= {np.abs(want).max():.2f}), "
          f"running stats {stat_err:.2e}")
    assert got.shape == (4, 6, 6, 1) and stat_err <= TOL and err64 <= TOL


def test_parity_eval_mode(ref, ref_sd):
    d = copy.deepcopy(ref)
    model = _ours(ref_sd)
    x = _x(2, b=2)
    want = _torch_forward(d, x, train=False)
    got_override = np.asarray(model(jnp.asarray(x), use_running_average=True))
    model.eval()
    got = np.asarray(model(jnp.asarray(x)))
    print(f"discriminator eval-mode max abs err: {_assert_close(got, want):.2e}")
    assert np.array_equal(got, got_override)
    assert _max_err(_our_stats(model), _torch_stats(d)) == 0.0  # eval mode leaves the stats alone


def _apply(graphdef, params, stats, x, use_running_average=False, stats_groups=None):
    """Pure forward as the jitted steps do it: merge fresh variables (copy=True), call, return the new stats."""
    model = nnx.merge(graphdef, params, stats, copy=True)
    return model(x, use_running_average, stats_groups), nnx.state(model, nnx.BatchStat)


def test_pure_jitted_step_two_separate_calls(ref, ref_sd):
    """Real and fake as two forward calls in one jitted function: separate batch stats, two stat updates."""
    d = copy.deepcopy(ref)
    graphdef, params, stats = nnx.split(_ours(ref_sd), nnx.Param, nnx.BatchStat)

    @jax.jit
    def step(params, stats, real, fake):
        def loss_fn(params):
            lr, s = _apply(graphdef, params, stats, real)
            lf, s = _apply(graphdef, params, s, fake)
            loss = jnp.mean(jax.nn.relu(1 - lr)) + jnp.mean(jax.nn.relu(1 + lf))
            return loss, (lr, lf, s)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return aux, grads

    real, fake = _x(3), _x(4)
    (lr, lf, new_stats), grads = step(params, stats, jnp.asarray(real), jnp.asarray(fake))
    want_r, want_f = _torch_forward(d, real, True), _torch_forward(d, fake, True)
    _assert_close(lr, want_r), _assert_close(lf, want_f)
    assert _max_err(_our_stats(nnx.merge(graphdef, params, new_stats)), _torch_stats(d)) <= TOL
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(params))  # grads only for Params
    before = jax.tree.map(np.asarray, stats)
    _apply(graphdef, params, stats, jnp.asarray(real))  # eager: the caller's state is not mutated
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(stats), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)


def test_stats_groups(ref, ref_sd):
    x = _x(5, b=6)
    plain, g1 = _ours(ref_sd), _ours(ref_sd, stats_groups=1)
    assert np.array_equal(np.asarray(plain(jnp.asarray(x))), np.asarray(g1(jnp.asarray(x))))
    k = 3
    model = _ours(ref_sd, stats_groups=k)
    got = np.asarray(model(jnp.asarray(x)))
    copies = [copy.deepcopy(ref) for _ in range(k)]
    chunks = np.split(x, k)
    want = np.concatenate([_torch_forward(c, chunk, True) for c, chunk in zip(copies, chunks, strict=True)])
    _assert_close(got, want)
    stats = [_torch_stats(c) for c in copies]
    mean_stats = {key: np.mean([s[key] for s in stats], axis=0) for key in stats[0]}
    assert _max_err(_our_stats(model), mean_stats) <= TOL
    # The group split changes the answer (otherwise this test could not tell groups from plain BN).
    assert np.max(np.abs(got - np.asarray(plain(jnp.asarray(x))))) > 1e-3
    with pytest.raises(ValueError, match="must divide"):
        model(jnp.asarray(x[:4]))
    _assert_close(plain(jnp.asarray(x), stats_groups=k), want)  # per-call override


def test_sharded_batch_sync_bn_vs_groups(ref_sd):
    """Under jit, batch sharded over ('data', 'fsdp'): G=1 is global (sync) BN, G=#shards per-device BN."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    x = _x(6, b=8, size=32)
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    graphdef, params, stats = nnx.split(_ours(ref_sd), nnx.Param, nnx.BatchStat)
    fwd = jax.jit(_apply, static_argnums=(0, 4, 5))
    sharded_global, _ = fwd(graphdef, params, stats, xs, False, 1)
    unsharded_global, _ = fwd(graphdef, params, stats, jnp.asarray(x), False, 1)
    _assert_close(sharded_global, unsharded_global)
    per_device, _ = fwd(graphdef, params, stats, xs, False, 8)
    one_device = [np.asarray(fwd(graphdef, params, stats, jnp.asarray(x[i:i + 1]), False, 1)[0])
                  for i in range(8)]
    _assert_close(per_device, np.concatenate(one_device))


# ---- conversion -----------------------------------------------------------------------------------------


def _write(tmp_path, sd, name="src.safetensors") -> str:
    path = tmp_path / name
    write_safetensors(path, sd)
    return str(path)


def test_bare_state_dict_cli_and_back_to_taming(ref, ref_sd, tmp_path):
    src = _write(tmp_path, ref_sd)
    assert convert_cli.main(["--kind", "discriminator", "--src", src, "--dst", str(tmp_path / "flax")]) == 0
    model = disc.load(tmp_path / "flax")
    x = _x(7, b=2)
    _assert_close(model(jnp.asarray(x)), _torch_forward(copy.deepcopy(ref), x, True))
    back = tmp_path / "back.safetensors"
    argv = ["--kind", "discriminator", "--src", str(tmp_path / "flax"), "--dst", str(back), "--to", "taming"]
    assert convert_cli.main(argv) == 0
    from taming.modules.discriminator.model import NLayerDiscriminator

    d2 = NLayerDiscriminator()
    d2.load_state_dict({k: torch.from_numpy(v) for k, v in read_state_dict(back).items()}, strict=True)
    back_sd = d2.state_dict()
    assert all(np.array_equal(v, back_sd[k].numpy()) for k, v in ref_sd.items() if "num_batches" not in k)
    assert disc.load(tmp_path / "flax", stats_groups=2).stats_groups == 2


def test_ldm_checkpoint_with_other_keys(ref, ref_sd, tmp_path):
    sd = {conv.LDM_PREFIX + k: torch.from_numpy(v) for k, v in ref_sd.items()}
    sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, src)
    summary = conv.convert(str(src), str(tmp_path / "flax"))
    assert "skipped 3 keys" in summary and "encoder.conv_in.weight" in summary
    assert "num_batches_tracked" not in summary
    a, b = flat_variables(disc.load(tmp_path / "flax")), flat_variables(_ours(ref_sd))
    assert all(np.array_equal(a[k], b[k]) for k in b) and a.keys() == b.keys()
    assert conv.discriminator_from_ldm_state_dict({"encoder.conv_in.weight": np.zeros(1)}) is None


def test_missing_unexpected_misshaped_named(ref_sd, tmp_path):
    sd = {conv.LDM_PREFIX + k: v for k, v in ref_sd.items()}
    del sd["loss.discriminator.main.6.running_var"]
    sd["loss.discriminator.main.12.weight"] = np.zeros((1,), np.float32)
    sd["loss.discriminator.main.5.weight"] = np.zeros((256, 128, 3, 3), np.float32)
    sd["decoder.conv_out.weight"] = np.zeros((3, 128, 3, 3), np.float32)  # not ours: skipped, not an error
    with pytest.raises(KeyMismatchError) as e:
        conv.convert(_write(tmp_path, sd), str(tmp_path / "out"))
    assert e.value.missing == ["loss.discriminator.main.6.running_var"]
    assert e.value.unexpected == ["loss.discriminator.main.12.weight"]
    assert [m[0] for m in e.value.mismatched] == ["loss.discriminator.main.5.weight"]
    with pytest.raises(KeyMismatchError, match="main.8.weight"):  # a bare dict is strict on every key
        conv.discriminator_from_ldm_state_dict(
            {conv.LDM_PREFIX + k: v for k, v in ref_sd.items() if k != "main.8.weight"})
    bare = dict(ref_sd, **{"extra.weight": np.zeros(1, np.float32)})
    with pytest.raises(KeyMismatchError, match="extra.weight"):
        conv.convert(_write(tmp_path, bare, "bare.safetensors"), str(tmp_path / "out"))
    with pytest.raises(KeyMismatchError, match="mis-shaped"):  # architecture options are honoured
        conv.convert(_write(tmp_path, ref_sd, "ok.safetensors"), str(tmp_path / "out"), ndf=32)
    with pytest.raises(ValueError, match="unknown --extra option.*depth for --kind discriminator"):
        conv.convert(_write(tmp_path, ref_sd, "ok.safetensors"), str(tmp_path / "out"), depth="3")
    with pytest.raises(ValueError, match="no discriminator keys"):  # e.g. an autoencoder-only checkpoint
        conv.convert(_write(tmp_path, {"encoder.conv_in.weight": np.zeros(1, np.float32)}, "ae.safetensors"),
                     str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_dst_overwrite_and_failed_write(ref_sd, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    src = _write(tmp_path / "in", ref_sd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert convert_cli.main(["--kind", "discriminator", "--src", src, "--dst", str(out)]) == 1
    assert (out / "keep").exists()
    assert convert_cli.main(["--kind", "discriminator", "--src", src, "--dst", str(out), "--overwrite"]) == 0
    assert not (out / "keep").exists()
    assert convert_cli.main(["--kind", "discriminator", "--src", src, "--dst", str(out), "--to", "x"]) == 2

    def broken(path, *args, **kwargs):
        with open(path, "w") as f:
            f.write("partial")
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        conv.convert(str(out), str(tmp_path / "back.safetensors"), to="taming")
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
