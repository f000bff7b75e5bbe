"""Mesh construction, batch assembly and rule-based shardings on 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eqvae_jax.parallel import mesh


def test_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    assert mesh.mesh_shape(8, -1, 1) == (8, 1)
    assert mesh.mesh_shape(8, 2, -1) == (2, 4)
    with pytest.raises(ValueError, match="does not cover"):
        mesh.mesh_shape(8, 3, 1)
    with pytest.raises(ValueError, match="at most one"):
        mesh.mesh_shape(8, -1, -1)
    m = mesh.make_mesh(2, 4)
    assert dict(m.shape) == {"data": 2, "fsdp": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


def test_global_batch_is_sharded_over_both_axes():
    m = mesh.make_mesh(4, 2)
    host = np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3)
    g = jax.device_put(host, mesh.batch_sharding(m))
    assert mesh.batch_divisor(m) == 8
    assert len(g.addressable_shards) == 8 and g.addressable_shards[0].data.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(np.asarray(g), host)


def test_param_shardings_rules_then_fsdp_then_replicated():
    m = mesh.make_mesh(2, 4)
    tree = {"blocks": {"qkv": np.zeros((512, 1536)), "bias": np.zeros((1536,))}, "pos": np.zeros((256, 1024))}
    sh = mesh.param_shardings(tree, m, rules=[(r"^pos$", P())], fsdp_min_size=1024)
    assert sh["pos"].spec == P()
    assert sh["blocks"]["qkv"].spec == P(None, "fsdp")  # largest divisible dim
    assert sh["blocks"]["bias"].spec == P("fsdp")  # 1536 elements >= min size
    small = mesh.param_shardings(tree, m, fsdp_min_size=10**9)
    assert all(s.spec == P() for s in jax.tree.leaves(small))


def test_scanned_layer_rule_never_shards_the_depth_axis_and_data_zero_means_slices():
    m = mesh.make_mesh(2, 4)
    tree = {"params": {"blocks": {"w": np.zeros((12, 64, 256)), "b": np.zeros((12, 256))}, "head": np.zeros((8, 512))},
            "opt": {"mu": {"blocks": {"w": np.zeros((12, 64, 256))}}}}
    sh = mesh.param_shardings(tree, m, mesh.SCANNED_LAYERS, fsdp_min_size=1024)
    assert sh["params"]["blocks"]["w"].spec == P(None, None, "fsdp")  # 256 is the largest dim after depth
    assert sh["params"]["blocks"]["b"].spec == P(None, "fsdp")
    assert sh["opt"]["mu"]["blocks"]["w"].spec == sh["params"]["blocks"]["w"].spec  # optimizer moments follow
    assert sh["params"]["head"].spec == P(None, "fsdp")  # no rule: the default FSDP rule
    assert mesh.mesh_shape(8, 0, -1) == (1, 8) and mesh.mesh_shape(8, 0, -1, slices=2) == (2, 4)


def test_param_shardings_never_shard_the_scanned_layer_axis():
    m = mesh.make_mesh(2, 4)
    # depth 8 is the largest divisible dim of the first leaf: only the scanned rule keeps it whole
    tree = {"blocks": {"w": np.zeros((8, 4, 6)), "b": np.zeros((8, 3)), "s": np.zeros((8, 2))},
            "head": np.zeros((8, 4, 6))}
    sh = mesh.param_shardings(tree, m, mesh.SCANNED_LAYERS, fsdp_min_size=24)
    assert sh["blocks"]["w"].spec == P(None, "fsdp", None)
    assert sh["blocks"]["b"].spec == P()  # nothing but the layer axis divides by 4: replicated
    assert sh["blocks"]["s"].spec == P()  # below the minimum size
    assert sh["head"].spec == P("fsdp", None, None)  # not scanned: the largest divisible dim
    ruled = mesh.param_shardings(tree, m, [(r"blocks/w", P("fsdp")), *mesh.SCANNED_LAYERS], fsdp_min_size=24)
    assert ruled["blocks"]["w"].spec == P("fsdp")  # explicit rules still come first
