"""The memorization experiment's arms, sites and new measurements: the 10x passage-specific
criterion against a brute-force count, the fit's linear and feature parts against a direct
computation, the arms' coders and penalties, the grid of sites, and cell reuse when arms are added."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.config import LMConfig  # noqa: E402
from mechfaith.lm.corpus import CorpusConfig, eval_contexts, get_corpus  # noqa: E402
from mechfaith.lm.faithfulness import tokenize_text  # noqa: E402
from mechfaith.lm.model_cache import get_model  # noqa: E402
from mechfaith.studies import memorization as exp_mod  # noqa: E402
from mechfaith.studies.memorization import ExperimentConfig, run_experiment  # noqa: E402
from mechfaith.studies.memorization_arms import arm_coder_config, arm_penalty, init_thresholds, parse_arm  # noqa: E402
from mechfaith.studies.memorization_cells import site_cells  # noqa: E402
from mechfaith.studies.memorization_data import build_experiment_data  # noqa: E402
from mechfaith.studies.memorization_metrics import measure_cell  # noqa: E402
from mechfaith.studies.memorization_specific import fit_parts, specific_features  # noqa: E402

torch.set_num_threads(1)
WORDS = "the king queen lord love death night day sword crown heart blood".split()
PASSAGE = "Four score and seven years ago our fathers brought forth"


def brute_force_specific(f_p, f_h, ratio):
    """Feature i counts when some passage activation is > 0 and, for EVERY held-out row h, the
    largest passage activation is >= ratio * f_i(h) (plain Python loops)."""
    out = []
    for i in range(f_p.shape[1]):
        best = max(float(v) for v in f_p[:, i])
        if best > 0 and all(best >= ratio * float(f_h[h, i]) for h in range(f_h.shape[0])):
            out.append(i)
    return out


def test_specific_features_match_a_brute_force_count():
    g = torch.Generator().manual_seed(1)
    n, m, nh, d = 40, 7, 50, 6
    f_p = torch.relu(torch.randn(m, n, generator=g)) * (torch.rand(m, n, generator=g) < 0.4)
    f_h = torch.relu(torch.randn(nh, n, generator=g)) * (torch.rand(nh, n, generator=g) < 0.3)
    f_h[:, :5] *= 0.05  # five features much weaker on held-out text
    f_h[:, 5:8] = 0.0  # three that never fire there
    f_p[:, 5] = 0.0  # ... one of which never fires on the passage either: not counted
    f_p[:, 0] = 0.0
    f_p[2, 0] = 2.5  # exactly at the boundary with held-out 0.25: counted (>=)
    f_h[:, 0] = 0.0
    f_h[4, 0] = 0.25
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=n, d_out=d, activation="relu"), generator=g).eval()
    y = torch.randn(m, d, generator=g)
    tokens = [f"t{i}" for i in range(m)]
    for ratio in (1.0, 10.0, 100.0):
        res = specific_features(coder, f_p, f_h, y, ratio, tokens, max_listed=1000)
        expected = brute_force_specific(f_p, f_h, ratio)
        assert res["n_specific_features"] == len(expected)
        assert sorted(f["index"] for f in res["specific_features"]) == expected
        # the output share of the chosen features, computed directly
        share = sum(float((f_p[t, expected] @ coder.W_dec[expected].detach()) @ y[t]) / float(y[t] @ y[t])
                    for t in range(m)) / m if expected else 0.0
        assert res["specific_share"] == pytest.approx(share, rel=1e-4, abs=1e-6)
    res = specific_features(coder, f_p, f_h, y, 10.0, tokens)
    assert 0 in [f["index"] for f in res["specific_features"]]
    feat = next(f for f in res["specific_features"] if f["index"] == 0)
    assert feat["ratio"] == pytest.approx(10.0) and feat["top_tokens"][0] == {"position": 3, "token": "t2",
                                                                              "activation": 2.5}
    never = [f for f in res["specific_features"] if f["heldout_max"] == 0]
    assert never and all(f["ratio"] is None for f in never)
    # the top tokens are the passage rows with the largest activations, largest first
    for f in res["specific_features"]:
        acts = [t["activation"] for t in f["top_tokens"]]
        assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(f["passage_max"])


@pytest.mark.parametrize("skip", [False, True])
def test_fit_parts_split_the_output_share(skip):
    g = torch.Generator().manual_seed(2)
    d, n = 5, 12
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=n, d_out=d, activation="relu", skip=skip), generator=g).eval()
    with torch.no_grad():
        coder.b_dec.copy_(torch.randn(d, generator=g))
        if skip:
            coder.W_skip.copy_(torch.randn(d, d, generator=g))
    x_p, y_p, x_h, y_h = (torch.randn(r, d, generator=g) for r in (4, 4, 30, 30))
    with torch.no_grad():
        yhat_p, yhat_h = coder(x_p), coder(x_h)
        res = fit_parts(coder, x_p, y_p, yhat_p, x_h, y_h, yhat_h)
        for name, x, y, yhat in (("passage", x_p, y_p, yhat_p), ("heldout", x_h, y_h, yhat_h)):
            lin = torch.stack([coder.b_dec + (x[t] @ coder.W_skip if skip else 0) for t in range(x.shape[0])])
            share = [float(lin[t] @ y[t] / (y[t] @ y[t])) for t in range(x.shape[0])]
            whole = [float(yhat[t] @ y[t] / (y[t] @ y[t])) for t in range(x.shape[0])]
            assert res[f"{name}_linear_share"] == pytest.approx(sum(share) / len(share), rel=1e-4)
            assert res[f"{name}_linear_share"] + res[f"{name}_feature_share"] == pytest.approx(
                sum(whole) / len(whole), rel=1e-4)
        lin_p = coder.b_dec + (x_p @ coder.W_skip if skip else 0)
        lin_h = coder.b_dec + (x_h @ coder.W_skip if skip else 0)
        ratio = float((lin_p - y_p).pow(2).sum(1).mean() / (lin_h - y_h).pow(2).sum(1).mean())
    assert res["linear_passage_mse_ratio"] == pytest.approx(ratio, rel=1e-4)


def test_arms_build_their_coders_and_penalties():
    assert parse_arm("relu-tanh-skip").skip and parse_arm("relu-tanh-skip").kind == "relu-tanh"
    for bad in ("relu", "topk-skip-skip", "", "sigmoid"):
        with pytest.raises(ConfigError, match="unknown arm"):
            parse_arm(bad)
    cfg = arm_coder_config(parse_arm("topk"), 8, 6, 32, 4)
    assert (cfg.activation, cfg.k, cfg.skip, cfg.d_out) == ("topk", 4, False, 6)
    cfg = arm_coder_config(parse_arm("jumprelu-skip"), 8, 6, 32, 0, jumprelu_bandwidth=0.5)
    assert (cfg.activation, cfg.skip, cfg.jumprelu_bandwidth) == ("jumprelu", True, 0.5)
    coder = SparseCoder(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    reached = init_thresholds(coder, x, 4.0)
    with torch.no_grad():
        l0 = float((coder.forward_full(x).f > 0).sum(1).double().mean())
    assert reached == pytest.approx(4.0, abs=0.1) and l0 == pytest.approx(4.0, abs=0.1)
    assert arm_penalty(parse_arm("relu-tanh"), 0.3, 2.0, 1.0) == {"sparsity": "tanh_l1", "sparsity_coef": 0.3,
                                                                  "tanh_scale": 2.0}
    assert arm_penalty(parse_arm("jumprelu"), 0.3, 2.0, 1.0)["sparsity"] == "l0"
    assert arm_penalty(parse_arm("topk-skip"), 0.3, 2.0, 1.0)["sparsity"] == "none"


def test_the_grid_of_sites_and_cells():
    cfg = ExperimentConfig(layers=[15, 3], passages=["default", "numbers"], arms=["topk-skip", "relu-tanh"],
                           other_site_arms=["relu-tanh"], rates=[0.0, 0.01, 0.05], jacobian_coefs=[0.0, 0.1],
                           jacobian_at="max", jacobian_arms=[], ks=[8, 32], seeds=[0])
    assert cfg.sites() == [("default", 15, ["topk-skip", "relu-tanh"]), ("numbers", 15, ["relu-tanh"]),
                           ("default", 3, ["relu-tanh"])]
    cells = site_cells(cfg, "default", 15, ["topk-skip", "relu-tanh"])
    # TopK: 2 k x (3 plain rates + 1 JM rate); relu-tanh: no k, 3 + 1
    assert len(cells) == 2 * 4 + 4
    assert {c["k"] for c in cells if c["arm"] == "relu-tanh"} == {0}
    assert all(c["rate"] == 0.05 for c in cells if c["jacobian_coef"] > 0)
    assert "default_L15_relu-tanh_rate0.05_jac0.1_seed0" in {c["name"] for c in cells}
    assert len({c["name"] for c in cells}) == len(cells)
    every = dict(cfg.__dict__, jacobian_at="all")
    assert len(site_cells(ExperimentConfig(**every), "default", 15, ["relu-tanh"])) == 6
    # Jacobian matching only for the jacobian_arms; the other sites at their own rates, plain only
    some = ExperimentConfig(**dict(cfg.__dict__, jacobian_arms=["relu-tanh"], other_site_rates=[0.0, 0.01]))
    cells = site_cells(some, "default", 15, ["topk-skip", "relu-tanh"])
    assert {c["arm"] for c in cells if c["jacobian_coef"] > 0} == {"relu-tanh"} and len(cells) == 2 * 3 + 4
    other = site_cells(some, "numbers", 15, ["relu-tanh"], main=False)
    assert [(c["rate"], c["jacobian_coef"]) for c in other] == [(0.0, 0.0), (0.01, 0.0)]
    both = ExperimentConfig(**dict(some.__dict__, other_site_jacobian=True))
    assert [(c["rate"], c["jacobian_coef"]) for c in site_cells(both, "numbers", 15, ["relu-tanh"], main=False)] == [
        (0.0, 0.0), (0.01, 0.0), (0.01, 0.1)]
    for kw in ({"arms": ["topk", "nope"]}, {"other_site_arms": ["x-skip"]}, {"layers": []}, {"layers": [-2]},
               {"passages": []}, {"passages": ["no/such/file.txt"]}, {"jacobian_at": "some"},
               {"tanh_coef": 0.0}, {"jumprelu_coef": -1.0}, {"specific_ratio": 0.5}, {"arms": ["topk", "topk"]},
               {"jumprelu_init_l0": 0.0}, {"jacobian_arms": ["relu"]}, {"other_site_rates": [2.0]}):
        with pytest.raises(ConfigError):
            ExperimentConfig(**kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmarms")
    texts = root / "texts"
    texts.mkdir()
    rng = random.Random(5)
    for i in range(4):
        (texts / f"play{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1200)))
    (root / "passage.txt").write_text(PASSAGE)
    corpus = CorpusConfig(source=str(texts), context_length=20, val_fraction=0.25)
    lm = get_model(LMConfig(model="random-llama", layer=1))
    return root, corpus, lm


def test_measure_cell_counts_specific_features_as_brute_force_does(setup):
    _, corpus, lm = setup
    c = get_corpus(lm, corpus)
    held, _ = eval_contexts(lm, corpus, 8)
    data = build_experiment_data(lm.adapter, c.train[:20], held, tokenize_text(lm, PASSAGE), layer=1,
                                 input_site="mlp_in", output_site="mlp_out", max_rate=0.2, eval_contexts=6,
                                 passage_eval_contexts=2, detector_contexts=8, detector_rate=0.5, batch_contexts=8)
    d = lm.adapter.d_model
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=48, d_out=d, activation="relu", skip=True),
                        generator=torch.Generator().manual_seed(4)).eval()
    with torch.no_grad():  # one feature aimed at the passage's first row, off on held-out text
        u = data.x_passage[0] / data.x_passage[0].norm()
        coder.W_enc[:, 0] = u
        coder.b_enc[0] = -0.9 * float(data.x_passage[0] @ u)
        coder.b_enc[0] = min(float(coder.b_enc[0]), -float((data.x_eval @ u).max()) * 1.01)
    reference = lm.adapter.mlp_function(1, "mlp_in", "mlp_out")
    m = measure_cell(coder, reference, data, adapter=lm.adapter, layer=1, input_site="mlp_in",
                     output_site="mlp_out", jacobian_rows=32, n_probes=1, passage_probes=2, batch_contexts=8,
                     specific_ratio=10.0, passage_tokens=[f"<{i}>" for i in data.passage_ids])
    with torch.no_grad():
        f_p = coder.forward_full(data.x_passage).f
        f_h = coder.forward_full(data.x_eval).f
        whole = float((coder(data.x_passage) * data.y_passage).sum(1).div(data.y_passage.pow(2).sum(1)).mean())
    expected = brute_force_specific(f_p, f_h, 10.0)
    assert m["n_specific_features"] == len(expected) and 0 in expected
    assert sorted(f["index"] for f in m["specific_features"]) == sorted(expected)[:20]
    assert m["passage_linear_share"] + m["passage_feature_share"] == pytest.approx(whole, rel=1e-4)


def tiny_sites(root, **kw):
    base = dict(model="random-llama", layers=[1, 0], passages=[str(root / "passage.txt"), "numbers"],
                arms=["topk", "relu-tanh"], other_site_arms=["relu-tanh"], rates=[0.0, 0.2],
                jacobian_coefs=[0.0, 0.5], jacobian_at="max", jacobian_arms=[], other_site_rates=[],
                ks=[4], seeds=[0], n_latents=32, steps=10,
                batch_size=64, train_tokens=500, tanh_coef=0.05, eval_contexts=6, passage_eval_contexts=2,
                detector_contexts=6, jacobian_rows=32, eval_probes=1, batch_contexts=8)
    base.update(kw)
    return ExperimentConfig(**base)


def test_sites_arms_and_reuse_when_arms_are_added(setup, monkeypatch):
    root, corpus, _ = setup
    out = root / "sites"
    rep = run_experiment(tiny_sites(root), corpus, out, progress=False)
    on_disk = json.loads((out / "experiment.json").read_text())
    sites = {(c["passage"], c["layer"], c["arm"]) for c in on_disk["cells"]}
    assert sites == {("passage", 1, "topk"), ("passage", 1, "relu-tanh"), ("numbers", 1, "relu-tanh"),
                     ("passage", 0, "relu-tanh")}
    assert len(on_disk["cells"]) == 2 * 3 + 2 * 2 and set(on_disk["data"]) == {"passage_L1", "numbers_L1", "passage_L0"}
    assert on_disk["layers"] == [1, 0] and set(on_disk["passages"]) == {"passage", "numbers"}
    # the numbers passage reuses the layer's unplanted rows: the same training contexts
    assert on_disk["data"]["numbers_L1"]["train_tokens"] == on_disk["data"]["passage_L1"]["train_tokens"]
    for c in on_disk["cells"]:
        assert "n_specific_features" in c["metrics"] and "passage_feature_share" in c["metrics"]
        assert (c["k"] == 4) == (c["arm"] == "topk")
    assert any("dedicated datapoint features" in f for f in rep.findings)
    assert any("FVE reached" in f for f in rep.findings)
    assert any("Jacobian matching (coef 0.5)" in f for f in rep.findings)
    # adding an arm (and changing the other arms' coefficient) trains only the new cells
    trained = []
    real = exp_mod.train_cell

    def counting(data, reference, cfg, cell, progress=False):
        trained.append(cell["name"])
        return real(data, reference, cfg, cell, progress)

    monkeypatch.setattr(exp_mod, "train_cell", counting)
    again = run_experiment(tiny_sites(root, arms=["topk", "relu-tanh", "jumprelu"], jumprelu_coef=0.01),
                           corpus, out, progress=False)
    assert trained and all("jumprelu" in name for name in trained) and len(trained) == 3
    assert len(again.cells) == 13
