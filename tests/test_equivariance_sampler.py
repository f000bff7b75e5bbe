"""Host-side transform sampler: branch frequencies, value sets, state round trip, config, static plans."""

import json
from collections import Counter

import ml_collections
import numpy as np
import pytest

from eqvae_jax.losses import equivariance as eq
from eqvae_jax.losses.equivariance import Branch, BranchPlan, Draw, TransformConfig, TransformSampler
from eqvae_jax.typed_config import default_config, parse

N = 40_000


def test_branch_frequencies_and_value_sets_match_the_reference():
    cfg = TransformConfig()
    sampler = TransformSampler(cfg, seed=23)
    draws = [sampler.draw() for _ in range(N)]
    freq = Counter(d.branch for d in draws)
    print({b.value: freq[b] / N for b in Branch})
    for branch, p in cfg.marginals().items():
        assert abs(freq[branch] / N - p) < 4 * np.sqrt(p * (1 - p) / N), (branch, freq[branch] / N, p)
    assert cfg.marginals() == {Branch.EQUIVARIANCE: 0.5, Branch.LOWRES: 0.125, Branch.PLAIN: 0.375}
    eqd = [d for d in draws if d.branch is Branch.EQUIVARIANCE]
    low = [d for d in draws if d.branch is Branch.LOWRES]
    assert {d.rot_k for d in eqd} == {1, 2, 3}
    assert {d.scale[0] for d in eqd} == {d.scale[0] for d in low} == set(range(8, 32))
    assert all(d.scale[0] == d.scale[1] and d.denominator == 32 for d in eqd + low)  # isotropic by default
    assert all(d.rot_k == 0 for d in low)
    counts = Counter(d.scale[0] for d in eqd)
    assert max(counts.values()) / min(counts.values()) < 1.3  # uniform over the 24 scales


def test_state_round_trips_through_json_and_repeats_the_sequence():
    sampler = TransformSampler(TransformConfig(anisotropic=True), seed=5)
    for _ in range(17):
        sampler.draw()
    state = json.loads(json.dumps(sampler.state()))
    first = [sampler.draw() for _ in range(50)]
    restored = TransformSampler(TransformConfig(anisotropic=True), seed=999)
    restored.set_state(state)
    assert [restored.draw() for _ in range(50)] == first
    assert [TransformSampler(TransformConfig(), 1).draw() for _ in range(3)] != first[:3]


def test_anisotropic_draws_independent_scales():
    sampler = TransformSampler(TransformConfig(anisotropic=True), seed=0)
    eqd = [d for d in (sampler.draw() for _ in range(2000)) if d.branch is Branch.EQUIVARIANCE]
    assert sum(d.scale[0] != d.scale[1] for d in eqd) > 0.9 * len(eqd)


def test_config_from_config_dict_and_validation():
    section = default_config(TransformConfig)
    assert isinstance(section, ml_collections.ConfigDict)
    assert parse(TransformConfig, section) == TransformConfig()
    section.scale_numerators = [16, 24]
    section.p_equivariance = 0.25
    cfg = parse(TransformConfig, section)
    assert cfg.scale_numerators == (16, 24) and cfg.marginals()[Branch.PLAIN] == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="unknown"):
        parse(TransformConfig, {"p_prior": 0.5})
    with pytest.raises(ValueError):
        TransformConfig(rotations=(4,))


def test_plans_bound_the_variants():
    plans = eq.all_plans(TransformConfig(), (256, 256))
    assert eq.plans_summary(plans) == {"equivariance": 24, "lowres": 24, "plain": 1}
    assert len(set(plans)) == 49 and all(p.rot_parity is None for p in plans)
    # anisotropic: a non-square target fixes the rotation parity statically (odd turns swap H and W)
    aniso = eq.all_plans(TransformConfig(anisotropic=True, scale_numerators=(16, 24)), (64, 64))
    assert eq.plans_summary(aniso) == {"equivariance": 2 + 2 * 2, "lowres": 2, "plain": 1}
    plan, k = Draw(Branch.EQUIVARIANCE, (16, 24), 32, 3).plan((64, 64))
    assert plan == BranchPlan(Branch.EQUIVARIANCE, (16, 24), 32, 1) and k == 3
    assert plan.image_shape((64, 64)) == (48, 32)
    assert Draw(Branch.EQUIVARIANCE, (16, 16), 32, 3).plan((64, 64))[0].rot_parity is None
    sampler = TransformSampler(TransformConfig(anisotropic=True, scale_numerators=(16, 24)), seed=0)
    seen = {sampler.draw().plan((64, 64))[0] for _ in range(400)}
    assert seen == set(aniso)
