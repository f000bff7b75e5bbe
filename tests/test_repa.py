"""REPA pieces: the DiT block tap against unscanned blocks and the torch reference, the projector against
REPA's build_mlp, the projection loss against a numpy transcription of REPA's loss.py, and the teacher input
against REPA's preprocess_raw_image in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import repa_reference as ref_repa
import torch
from dit_parity import TINY, inputs, ours_from, randomized_reference
from flax import nnx

from eqvae_jax.models import dinov2, repa
from eqvae_jax.models.dit import DiTConfig
from eqvae_jax.models.weights import assign_variables, flat_variables

DEEP = DiTConfig(**{**TINY.__dict__, "depth": 4})


def unscanned_blocks(model, x, t, y, k):
    """The first k blocks run one by one (each block's slice of the stacked state merged on its own)."""
    h = model.x_embedder(jnp.asarray(x)).astype(jnp.float32) + model.pos_embed[...]
    c = model.t_embedder(jnp.asarray(t)).astype(jnp.float32) + model.y_embedder(jnp.asarray(y))
    graphdef, state = nnx.split(model.blocks)
    for i in range(k):
        h = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(h, c)
    return np.asarray(h)


def reference_taps(ref, x, t, y):
    """Outputs of every block of the torch reference DiT, captured with forward hooks."""
    taps = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: taps.append(out.numpy().copy())) for b in ref.blocks]
    with torch.no_grad():
        ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    for h in hooks:
        h.remove()
    return taps


@pytest.mark.parametrize("remat", [False, True])
def test_tap_equals_unscanned_blocks_and_output_is_unchanged(remat):
    ref = randomized_reference(DEEP, seed=4)
    model = ours_from(ref, DEEP, remat=remat)
    x, t, y = inputs(DEEP)
    full = np.asarray(jax.jit(lambda a, b, c: model(a, b, c))(x, t, y))
    torch_taps = reference_taps(ref, x, t, y)
    for k in (1, 3, 4):
        out, tapped = jax.jit(lambda a, b, c, k=k: model(a, b, c, tap=k))(x, t, y)
        assert tapped.shape == (3, DEEP.num_patches, DEEP.hidden_size) and tapped.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), full, rtol=1e-5, atol=1e-5)  # XLA fusion may differ
        scale = np.abs(torch_taps[k - 1]).max()
        err_loop = np.abs(np.asarray(tapped) - unscanned_blocks(model, x, t, y, k)).max() / scale
        err_torch = np.abs(np.asarray(tapped) - torch_taps[k - 1]).max() / scale
        print(f"tap after block {k}/4 (remat={remat}, tokens up to {scale:.0f}): max error relative to that, "
              f"vs unscanned blocks {err_loop:.1e}, vs torch reference {err_torch:.1e}")
        assert err_loop <= 2e-6 and err_torch <= 5e-6  # a few float32 ulps
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"tap=.*\[1, 4\]"):
            model(x, t, y, tap=bad)


def test_alignment_gradient_reaches_only_the_tapped_blocks():
    model = ours_from(randomized_reference(DEEP, seed=5), DEEP)
    x, t, y = inputs(DEEP)
    target = jax.random.normal(jax.random.key(0), (3, DEEP.num_patches, DEEP.hidden_size))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        _, h = nnx.merge(graphdef, p, rest)(x, t, y, tap=2)
        return repa.projection_loss([target], [h])

    grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(params))
    qkv = next(np.asarray(v.get_value()) for path, v in grads if path == ("blocks", "attn", "qkv", "kernel"))
    assert np.abs(qkv[:2]).max() > 0 and not qkv[2:].any()


def test_projector_matches_build_mlp_and_init():
    proj = repa.Projector(32, z_dim=24, projector_dim=48, rngs=nnx.Rngs(0))
    v = flat_variables(proj, nnx.Param)
    assert sorted(v) == [f"linear_{i}/{leaf}" for i in (0, 2, 4) for leaf in ("bias", "kernel")]
    assert not any(v[f"linear_{i}/bias"].any() for i in (0, 2, 4))
    bound = np.sqrt(6 / (48 + 48))  # xavier uniform
    assert bound * 0.9 < np.abs(v["linear_2/kernel"]).max() <= bound
    torch.manual_seed(0)
    mlp = ref_repa.build_mlp(32, 48, 24)
    assign_variables(proj, {f"linear_{i}/{leaf}": (p.detach().numpy().T if leaf == "kernel" else p.detach().numpy())
                            for i in (0, 2, 4) for leaf, p in (("kernel", mlp[i].weight), ("bias", mlp[i].bias))})
    h = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        want = mlp(torch.from_numpy(h).reshape(-1, 32)).reshape(2, 5, 24).numpy()
    err = np.abs(np.asarray(proj(h)) - want).max()
    print(f"projector vs REPA build_mlp: max abs err {err:.2e}")
    assert err <= 1e-5


def test_projection_loss_matches_repa_loss_py():
    rng = np.random.default_rng(1)
    zs = [rng.standard_normal((3, 7, 16)).astype(np.float32) for _ in range(2)]
    zs_tilde = [rng.standard_normal((3, 7, 16)).astype(np.float32) * 5 for _ in range(2)]
    zs_tilde[1][0, 2] = 0.0  # a zero token: F.normalize's eps keeps it at cos 0
    want = ref_repa.proj_loss(zs, zs_tilde)
    got = float(repa.projection_loss([jnp.asarray(z) for z in zs], [jnp.asarray(z) for z in zs_tilde]))
    print(f"projection loss {got:.6f} vs REPA loss.py transcription {want:.6f}")
    assert abs(got - want) <= 1e-6
    one = float(repa.projection_loss(zs[:1], zs_tilde[:1]))
    assert abs(one - ref_repa.proj_loss(zs[:1], zs_tilde[:1])) <= 1e-6
    assert float(repa.projection_loss(zs, [2 * z for z in zs])) == pytest.approx(-1.0, abs=1e-6)
    grad = jax.grad(lambda z: repa.projection_loss(zs, [zs_tilde[0], z]))(jnp.asarray(zs_tilde[1]))
    assert np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match="equal"):
        repa.projection_loss(zs, [z[:, :3] for z in zs_tilde])


def test_preprocess_raw_image_matches_repa():
    rng = np.random.default_rng(2)
    for res, out in ((256, 224), (512, 448)):
        raw = rng.integers(0, 256, (2, res, res, 3), dtype=np.uint8)
        want = ref_repa.preprocess_raw_image(torch.from_numpy(raw).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        got = np.asarray(jax.jit(repa.preprocess_raw_image)(raw))
        err = np.abs(got - want).max()
        print(f"preprocess_raw_image {res} -> {out} vs REPA (torch bicubic): max abs err {err:.2e}")
        assert got.shape == (2, out, out, 3) and err <= 1e-5
    # jax's plain "bicubic" is another kernel: the exact method matters
    x = (raw.astype(np.float32) / 255.0 - np.asarray(repa.IMAGENET_MEAN)) / np.asarray(repa.IMAGENET_STD)
    plain = np.asarray(jax.image.resize(x, (2, 448, 448, 3), method="bicubic", antialias=False))
    assert np.abs(plain - want).max() > 0.05
    with pytest.raises(ValueError, match="square"):
        repa.preprocess_raw_image(raw[:, :, :300])


def test_teacher_features_from_raw_crops():
    """A (tiny, random) DINOv2 with the 518 px position grid on REPA's 224 px teacher input: 16x16 tokens."""
    teacher = dinov2.build(dinov2.DINOv2Config(hidden_size=32, depth=1, num_heads=2, pos_grid=37), seed=1)
    raw = np.random.default_rng(3).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    z = repa.teacher_features(teacher, raw)
    want = teacher(repa.preprocess_raw_image(raw))["x_norm_patchtokens"]
    np.testing.assert_array_equal(np.asarray(z), np.asarray(want))
    assert z.shape == (2, 256, 32)
