"""The toy task: the ground-truth MLP module, the data, the experiment plan and its statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechfaith.errors import ConfigError
from mechfaith.toy.data import datapoint, sample_sparse, sample_with_repeats
from mechfaith.toy.experiments import MAIN_SETTINGS, QUICK, ToyConfig, claims, member_specs, quick_config, spearman
from mechfaith.toy.model import AbsMLP, abs_jacobian


def test_abs_mlp_is_a_real_relu_mlp_computing_abs():
    mlp = AbsMLP(7)
    assert mlp.W_in.shape == (7, 14) and mlp.W_out.shape == (14, 7)
    x = torch.randn(3, 5, 7)  # any leading shape
    torch.testing.assert_close(mlp(x), x.abs())
    assert mlp.hidden(x).shape == (3, 5, 14)
    with pytest.raises(ConfigError):
        AbsMLP(0)


def test_abs_mlp_jacobian_from_autodiff_is_diag_sign_with_zero_at_zero():
    mlp = AbsMLP(5)
    x = torch.tensor([0.5, -0.3, 0.0, 1.0, 0.0])
    jac = torch.func.jacrev(mlp)(x)
    torch.testing.assert_close(jac, torch.diag(torch.sign(x)))
    torch.testing.assert_close(abs_jacobian(x.unsqueeze(0))[0], jac)
    v = torch.randn(5)
    _, jv = torch.func.jvp(mlp, (x,), (v,))
    torch.testing.assert_close(jv, jac @ v)


def test_sparse_data_statistics():
    gen = torch.Generator().manual_seed(0)
    x = sample_sparse((40000, 10), 0.1, gen)
    nz = x != 0
    assert abs(float(nz.float().mean()) - 0.1) < 0.005
    assert float(x.abs().max()) <= 1.0
    assert abs(float(x[nz].mean())) < 0.02  # symmetric around 0
    with pytest.raises(ConfigError):
        sample_sparse((2, 2), 0.0)


def test_repeats_follow_each_members_fraction():
    p = datapoint(8)
    assert p.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    rf = torch.tensor([0.0, 0.05, 0.5])
    x = sample_with_repeats(3, 20000, 8, 0.3, rf, p, torch.Generator().manual_seed(1))
    frac = (x == p).all(-1).float().mean(-1)
    assert float(frac[0]) == 0.0
    assert abs(float(frac[1]) - 0.05) < 0.01 and abs(float(frac[2]) - 0.5) < 0.02
    with pytest.raises(ConfigError):
        datapoint(3, 4)


def test_spearman_matches_an_independent_computation():
    a = np.array([0.0, 0.0, 0.3, 0.7, 0.7, 0.1])
    b = np.array([1, 2, 3, 5, 4, 2.5])
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).correlation)
    assert math.isnan(spearman(np.zeros(4), np.arange(4)))


def test_member_specs_cover_settings_variants_and_scan():
    cfg = ToyConfig(seeds=3, extra_seeds=2, scan_seeds=2, scan_repeat_fracs=[0.01, 0.1],
                    scan_sparsity_coefs=[0.1, 0.2, 0.4])
    specs = member_specs(cfg)
    names = [s.setting for s in specs]
    for name in MAIN_SETTINGS:
        assert names.count(name) == 3
    assert names.count("repetition_jacobian_jcp") == 2
    scan = [s for s in specs if s.setting == "scan"]
    assert len(scan) == 2 * 3 * 2
    assert [(s.repeat_frac, s.sparsity_coef) for s in scan[:3]] == [(0.01, 0.1)] * 2 + [(0.01, 0.2)]
    jac = [s for s in specs if s.setting == "repetition_jacobian"]
    assert all(s.jacobian_coef == cfg.jacobian_coef and s.repeat_frac == cfg.repeat_frac for s in jac)
    assert all(s.repeat_frac == 0 for s in specs if s.setting == "baseline")


def test_config_validation_and_quick_preset():
    with pytest.raises(ConfigError):
        ToyConfig(d=0)
    with pytest.raises(ConfigError):
        ToyConfig(n_ones=20)
    with pytest.raises(ConfigError):
        ToyConfig(scan_repeat_fracs=[1.5])
    q = quick_config(seeds=4)
    assert q.steps == QUICK["steps"] and q.seeds == 4


def test_claims_are_checked_with_a_noise_floor():
    base = {"memorization": 0.0, "seeds": [0, 1], "seeds_with_datapoint_feature": 0}
    rep = {"memorization": 0.7, "seeds": [0, 1], "seeds_with_datapoint_feature": 2}
    jac = {"memorization": 0.015, "seeds": [0, 1], "seeds_with_datapoint_feature": 0}
    scan = {"spearman": {"product": 0.8, "repeat_frac": 0.5, "sparsity_coef": 0.6}}
    c = claims({"baseline": base, "repetition": rep, "repetition_jacobian": jac}, scan)
    assert all(v["ok"] for v in c.values())
    jac["memorization"] = 0.05
    rep["seeds_with_datapoint_feature"] = 1
    c = claims({"baseline": base, "repetition": rep, "repetition_jacobian": jac}, scan)
    assert not c["jacobian_within_2x_baseline"]["ok"] and not c["datapoint_feature_every_seed"]["ok"]
