"""The faithfulness instruments on planted cases (plain tensors, small MLPs, hand-built coders):
JVP Jacobian error vs the exact one, spectra, the datapoint-feature detector, off-distribution
ratios, the gradient-masking detector and the assembled report."""

import json
import math

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import ConfigError, InputError
from mechfaith.faithfulness.agreement import jacobian_agreement, jacobian_spectra, per_row_jvp_errors, spectrum_summary
from mechfaith.faithfulness.datapoints import DatapointConfig, detect_datapoint_features
from mechfaith.faithfulness.jacobian import exact_jacobians, jvp_error_estimate
from mechfaith.faithfulness.masking import MaskingConfig, detect_gradient_masking
from mechfaith.faithfulness.memorization import feature_memorization
from mechfaith.faithfulness.offdist import offdistribution_report, perturb, set_errors
from mechfaith.faithfulness.report import FaithfulnessConfig, faithfulness_report

torch.set_num_threads(1)


def small_mlp(d_in=6, d_hidden=24, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d_in, d_hidden, generator=g) / math.sqrt(d_in)
    b1 = 0.1 * torch.randn(d_hidden, generator=g)
    w2 = torch.randn(d_hidden, d_out, generator=g) / math.sqrt(d_hidden)

    def mlp(x):
        return torch.nn.functional.gelu(x @ w1 + b1) @ w2
    return mlp


def random_coder(d_in, n, d_out, seed=0, **kw):
    cfg = CoderConfig(d_in=d_in, n_latents=n, d_out=d_out, **kw)
    coder = SparseCoder(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        coder.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 2))
    return coder.eval()


def exact_rel(ref, coder, x):
    jr = exact_jacobians(ref, x).double()
    jt = coder.jacobian(x).double()
    jr, jt = jr.detach(), jt.detach()
    return float((jr - jt).pow(2).sum() / jr.pow(2).sum()), (jr - jt).pow(2).sum((1, 2)), jr.pow(2).sum((1, 2))


# ----------------------------------------------------------------------------- Jacobian agreement
def test_jvp_relative_error_agrees_with_exact_within_standard_error():
    ref = small_mlp()
    coder = random_coder(6, 20, 5, skip=True)
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(3))
    exact, _, _ = exact_rel(ref, coder, x)
    res = jacobian_agreement(ref, coder, x, n_probes=4, generator=torch.Generator().manual_seed(4),
                             chunk_size=128)
    est = res["all"]
    assert est["n_inputs"] == 400 and est["rel_error_se"] > 0
    assert abs(est["rel_error"] - exact) < 3 * est["rel_error_se"], (est, exact)
    # the standard error is honest: over repetitions the z-scores have spread about 1
    zs = []
    for seed in range(30):
        xs = torch.randn(60, 6, generator=torch.Generator().manual_seed(100 + seed))
        ex, _, _ = exact_rel(ref, coder, xs)
        e = jacobian_agreement(ref, coder, xs, n_probes=2, generator=torch.Generator().manual_seed(seed))["all"]
        zs.append((e["rel_error"] - ex) / e["rel_error_se"])
    zs = torch.tensor(zs)
    assert (zs.abs() < 2.5).float().mean() >= 0.85, zs
    assert 0.4 < float(zs.std()) < 2.0, zs


def test_one_chunk_matches_the_core_estimator_and_groups_partition_rows():
    ref = small_mlp(seed=1)
    coder = random_coder(6, 12, 5, seed=2)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(5))
    core = jvp_error_estimate(ref, coder, x, n_probes=3, generator=torch.Generator().manual_seed(9))
    mine = jacobian_agreement(ref, coder, x, n_probes=3, generator=torch.Generator().manual_seed(9))["all"]
    for k in ("sq_error", "sq_error_se", "ref_sq", "rel_error", "rel_error_se"):
        assert mine[k] == pytest.approx(getattr(core, k), rel=1e-9)
    mask = torch.arange(50) < 10
    e, r = per_row_jvp_errors(ref, coder, x, 3, torch.Generator().manual_seed(9))
    res = jacobian_agreement(ref, coder, x, {"first": mask, "rest": ~mask}, 3, torch.Generator().manual_seed(9))
    assert res["first"]["n_inputs"] == 10 and res["rest"]["n_inputs"] == 40
    assert res["first"]["rel_error"] == pytest.approx(float(e[:10].mean() / r[:10].mean()))
    assert res["rest"]["rel_error"] == pytest.approx(float(e[10:].mean() / r[10:].mean()))
    with pytest.raises(InputError):
        jacobian_agreement(ref, coder, x, {"bad": torch.ones(3, dtype=torch.bool)})


def test_spectra_shapes_and_rank_of_a_sparse_coder():
    ref = small_mlp(d_in=8, d_hidden=32, d_out=7)
    coder = random_coder(8, 30, 7, activation="topk", k=2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    sp = jacobian_spectra(ref, coder, x)
    assert sp.reference.shape == (5, 7) and sp.coder.shape == (5, 7)
    assert torch.allclose(sp.reference, torch.linalg.svdvals(exact_jacobians(ref, x).double()).float())
    assert (sp.reference[:, :-1] >= sp.reference[:, 1:] - 1e-6).all()
    assert sp.frobenius_rel_error == pytest.approx(exact_rel(ref, coder, x)[0], rel=1e-5)
    s_ref, s_tc = spectrum_summary(sp.reference, top_k=2), spectrum_summary(sp.coder, top_k=2)
    assert s_tc["numerical_rank"] <= 2 and s_tc["tail_mass"] < 1e-9  # rank <= k: no tail at all
    assert s_ref["numerical_rank"] == 7 and s_ref["tail_mass"] > 0.01
    assert len(s_ref["mean_normalized"]) == 7 and s_ref["mean_normalized"][0] == pytest.approx(1.0)
    flat = spectrum_summary(torch.ones(2, 4))
    assert flat["effective_rank"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------- datapoint detector
D = 12


def planted_case(seed=0, n=3000, repeat_frac=0.05):
    """Gaussian inputs with repeats of x* (tiny noise); a hand-built transcoder with ordinary
    features (random directions, one of them aligned with x*) and one datapoint feature."""
    g = torch.Generator().manual_seed(seed)
    ref = small_mlp(D, 48, D, seed=seed)
    x = torch.randn(n, D, generator=g)
    x_star = torch.randn(D, generator=g)
    x_star = 4.5 * x_star / x_star.norm()  # far out: no ordinary input reaches the planted bias
    rep = torch.rand(n, generator=g) < repeat_frac
    x[rep] = x_star + 1e-3 * torch.randn(int(rep.sum()), D, generator=g)
    n_lat = 41
    coder = SparseCoder(CoderConfig(d_in=D, n_latents=n_lat, d_out=D), generator=g).eval()
    with torch.no_grad():
        enc = torch.nn.functional.normalize(torch.randn(D, n_lat, generator=g), dim=0)
        enc[:, 0] = x_star / x_star.norm()  # ordinary feature along x*: fires on half of all inputs
        coder.W_enc.copy_(enc)
        coder.b_enc.zero_()
        coder.b_enc[1] = -2.5  # a rare ordinary feature: fires on diverse tail inputs only
        coder.W_dec.copy_(0.3 * torch.randn(n_lat, D, generator=g))
        lam = 10.0  # the datapoint feature: y += y* ReLU(lam (x_hat* . x) - b) / f(x*)
        coder.W_enc[:, 40] = lam * x_star / x_star.norm()
        coder.b_enc[40] = -lam * (x_star.norm() - 0.1)
        f_star = lam * 0.1
        coder.W_dec[40] = ref(x_star.unsqueeze(0))[0] / f_star
    return ref, coder, x, rep, x_star


def test_detector_flags_the_planted_datapoint_feature_and_no_ordinary_feature():
    ref, coder, x, rep, x_star = planted_case()
    report = detect_datapoint_features(coder, ref, x)
    assert [s.index for s in report.flagged] == [40]
    dp = report.flagged[0]
    assert dp.mass_share > 0.99 and dp.top_share == 1.0
    assert dp.output_share == pytest.approx(1.0, abs=0.1)  # it writes the repeated output itself
    assert bool(rep[dp.repeated_row])
    # the ordinary feature along x*: its top activations are all repeats (a candidate) ...
    cand = {s.index: s for s in report.candidates}
    assert 0 in cand and cand[0].top_share == 1.0
    # ... but most of its activation mass comes from diverse inputs, so it is not flagged
    assert cand[0].mass_share < 0.5 and not cand[0].flagged
    assert 1 not in cand  # the rare ordinary feature: its top inputs are all different
    d = report.to_dict()
    assert d["n_flagged"] == 1 and d["flagged"][0]["index"] == 40
    json.dumps(d)


def test_detector_with_context_keys_and_without_repeats():
    ref, coder, x, rep, x_star = planted_case(seed=1)
    # without repeats in the sample the datapoint feature is silent and nothing is flagged
    clean = x[~rep]
    assert detect_datapoint_features(coder, ref, clean).flagged == []
    # keys: rows with equal keys count as identical contexts even if their inputs differ more
    x2 = x.clone()
    x2[rep] = x_star + 0.5 * torch.randn(int(rep.sum()), D, generator=torch.Generator().manual_seed(0))
    keys = torch.where(rep, torch.tensor(7), torch.tensor(-1))
    strict = DatapointConfig(dup_cosine=0.999)
    no_keys = detect_datapoint_features(coder, ref, x2, cfg=strict)
    with_keys = detect_datapoint_features(coder, ref, x2, keys=keys, cfg=strict)
    assert 40 not in [s.index for s in no_keys.flagged]
    assert [s.index for s in with_keys.flagged] == [40]
    with pytest.raises(InputError):
        detect_datapoint_features(coder, ref, x, keys=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError):
        DatapointConfig(dup_cosine=1.5)


def test_memorization_analogue_equals_the_toy_metric():
    d = 6
    p = torch.tensor([1.0, 1, 1, 0, 0, 0])
    g = torch.Generator().manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=14, d_out=d), generator=g).eval()
    with torch.no_grad():
        enc = torch.cat([torch.eye(d), -torch.eye(d), (p / p.norm()).unsqueeze(1) * 5,
                         torch.randn(d, 1, generator=g)], dim=1)
        coder.W_enc.copy_(enc)
        coder.b_enc.zero_()
        coder.b_enc[12] = -5 * (p.norm() - 0.2)
        coder.W_dec.copy_(torch.cat([torch.eye(d), torch.eye(d), 0.7 * p.unsqueeze(0),
                                     torch.randn(1, d, generator=g)]))
    x = torch.rand(400, d, generator=g) * 2 - 1
    x[:40] = p
    report = detect_datapoint_features(coder, torch.abs, x)
    toy = feature_memorization(coder, p)
    assert [s.index for s in report.flagged] == [12]
    for s in report.candidates:
        if bool((x[s.repeated_row] == p).all()):
            assert s.memorization == pytest.approx(float(toy[s.index]), abs=1e-5)
    assert float(toy[12]) > 0.1


# ----------------------------------------------------------------------------- off-distribution
def test_offdistribution_ratios_on_a_planted_case():
    # reference: a GELU MLP; coder: its least-squares linear fit on small inputs (a transcoder with
    # only a skip). Good on small inputs, bad on large ones (where GELU is far from linear).
    ref = small_mlp(d_in=5, d_hidden=20, d_out=5, seed=4)
    g = torch.Generator().manual_seed(0)
    x_on = 0.3 * torch.randn(800, 5, generator=g)
    coder = SparseCoder(CoderConfig(d_in=5, n_latents=4, d_out=5, skip=True), generator=g).eval()
    with torch.no_grad():
        coder.W_enc.zero_()
        coder.b_enc.fill_(-1.0)  # latents never fire
        xa = torch.cat([x_on, torch.ones(800, 1)], 1)
        sol = torch.linalg.lstsq(xa, ref(x_on)).solution
        coder.W_skip.copy_(sol[:5])
        coder.b_dec.copy_(sol[5])
    x_far = 3.0 * torch.randn(800, 5, generator=g)
    rep = offdistribution_report(ref, coder, x_on, {"far": x_far}, noise_scales=(0.0, 2.0),
                                 n_probes=2, generator=torch.Generator().manual_seed(1))
    sets = rep["sets"]
    assert set(sets) == {"on_distribution", "far", "noise_0", "noise_2"}
    assert sets["on_distribution"]["rel_error_ratio"] == 1.0
    assert sets["noise_0"]["rel_error"] == pytest.approx(sets["on_distribution"]["rel_error"])
    assert sets["far"]["rel_error_ratio"] > 2 and sets["far"]["jacobian_ratio"] > 1.5  # measured 3.2, 2.2
    assert sets["far"]["rel_error_ratio"] - 1 > 5 * sets["far"]["rel_error_ratio_se"]
    assert sets["noise_2"]["rel_error_ratio"] > 1.5  # measured 2.3
    # independent computation of the on-distribution relative error
    with torch.no_grad():
        y = ref(x_on)
        direct = float((coder(x_on) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert sets["on_distribution"]["rel_error"] == pytest.approx(direct, rel=1e-6)
    xp = perturb(x_on, 0.5, torch.Generator().manual_seed(2))
    ratio = ((xp - x_on).pow(2).mean(1) / x_on.pow(2).mean(1)).mean().sqrt()
    assert float(ratio) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(InputError):
        perturb(x_on, -1.0)
    assert set_errors(ref, coder, x_on, jacobian=False).keys() >= {"mse", "rel_error", "rel_error_se"}


# ----------------------------------------------------------------------------- gradient masking
def test_masking_detector_flags_the_planted_feature_only():
    d, n = 10, 30
    g = torch.Generator().manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=n, d_out=d), generator=g).eval()
    x = torch.randn(5000, d, generator=g)
    with torch.no_grad():
        coder.b_enc.zero_()
        # planted: weights x20 on both sides, bias 4.5 sigma below zero (fires on ~0.0003 of inputs)
        coder.W_enc[:, 3] *= 20
        coder.W_dec[3] *= 20
        coder.b_enc[3] = -4.5 * 20 * float(coder.W_enc[:, 3].norm() / 20)
        # large weights but an ordinary bias: fires half the time -> not masking
        coder.W_enc[:, 5] *= 20
        coder.W_dec[5] *= 20
        # very negative bias but ordinary weights -> not masking
        coder.b_enc[7] = -4.0
    res = detect_gradient_masking(coder, x)
    assert [m["index"] for m in res["flagged"]] == [3]
    m = res["flagged"][0]
    assert m["weight_ratio"] > 100 and m["bias_z"] < -4 and m["firing_rate"] < 0.01
    assert len(res["per_feature"]["bias_z"]) == n
    assert res["n_toy_criterion"] >= 1
    assert detect_gradient_masking(coder, x, MaskingConfig(weight_ratio_threshold=1e6))["n_flagged"] == 0


# ----------------------------------------------------------------------------- the assembled report
def test_faithfulness_report_is_complete_and_json_safe():
    ref, coder, x, rep, x_star = planted_case(n=800, repeat_frac=0.08)
    groups = {"first": torch.arange(800) < 100, "other": torch.arange(800) >= 100}
    cfg = FaithfulnessConfig(n_probes=2, spectra_inputs=4, noise_scales=[0.5])
    seen = []
    out = faithfulness_report(ref, coder, x, groups=groups, other_sets={"shifted": x + 1.0},
                              typical=x[groups["other"]], cfg=cfg, progress=seen.append)
    assert seen == ["fidelity", "jacobian", "spectra", "datapoints", "offdist", "masking"]
    assert set(out["jacobian"]) == {"all", "first", "other"}
    assert out["spectra"]["n_inputs"] == 4 and len(out["spectra"]["reference"]["mean_normalized"]) == D
    assert out["datapoints"]["n_flagged"] == 1 and out["datapoints"]["flagged"][0]["index"] == 40
    assert set(out["offdist"]["sets"]) == {"on_distribution", "shifted", "noise_0.5"}
    assert out["fidelity"]["all"]["l0"] > 0 and out["fidelity"]["first"]["n"] == 100
    json.dumps(out, allow_nan=False)
    with pytest.raises(ConfigError):
        FaithfulnessConfig(noise_scales=[-1.0])
