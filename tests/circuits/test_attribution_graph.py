"""Attribution graphs on tiny random GPT-2 and Llama models, checked by intervention and brute force.

- every edge (feature, error and token sources; feature and logit targets) equals the change of its
  target when its source's write is removed in the frozen linearised model (run by explicit forward
  products in :func:`run_frozen`, a different computation from the graph's backward sweep);
- the frozen world and the live world reproduce the model's own logits without interventions;
- the graph's total effects equal feature ablations in the linear frozen world exactly;
- a budgeted graph's edges are exactly the full graph's among the kept nodes.
"""

from __future__ import annotations

import pytest
import torch

from mechfaith.circuits.attribution_graph import GraphConfig, build_attribution_graph, choose_logits
from mechfaith.circuits.graph_scores import total_effects
from mechfaith.circuits.interventions import Intervention, demeaned_logit, parse_intervention, run_frozen, run_live
from mechfaith.circuits.replacement import record_run
from mechfaith.errors import ConfigError
from tests.circuits.test_circuits_attribution import make_setup

SITES = ("mlp_in", "resid_pre", "mlp_in_normalized")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    lm, tcs, ids = make_setup(request.param, SITES)
    run = record_run(lm.model, ids, tcs)
    graph = build_attribution_graph(run, GraphConfig(max_feature_nodes=0, batch_size=7))
    return lm, run, graph


def _target_values(graph, world):
    """Every target's value in a frozen-world run: feature pre-activations, then demeaned logits."""
    pre = [world.pre[int(l)][int(p), int(i)] for l, p, i in graph.features]
    lg = [demeaned_logit(world.logits, graph.logits.pos, t) for t in graph.logits.tokens]
    return torch.cat([torch.stack(pre), torch.tensor(lg, dtype=torch.float64)])


def _check(measured, edge, scale):
    bad = (measured - edge).abs() > 1e-4 * torch.maximum(measured.abs(), torch.full_like(measured, 1e-3 * scale))
    return int(bad.sum())


def count_bad_edges(run, g, rtol: float = 1e-6) -> int:
    """Edges that differ from removing their source in the frozen linearised model (1e-4 relative);
    first checks that the frozen world gives the graph's target values (``rtol``)."""
    b = g.blocks
    base = _target_values(g, run_frozen(run, features="fixed"))
    assert torch.allclose(base, g.values, rtol=rtol, atol=rtol)  # llama: rotary in float32
    scale = float(g.edges.abs().max())
    bad = 0
    for j in range(b.n_features):
        l, p, i = (int(v) for v in g.features[j])
        after = _target_values(g, run_frozen(run, [Intervention(l, i, p)], features="fixed"))
        bad += _check(base - after, g.edges[:, j], scale)
    for e in range(b.n_errors):
        after = _target_values(g, run_frozen(run, features="fixed", drop_errors=[divmod(e, g.seq_len)]))
        bad += _check(base - after, g.edges[:, b.n_features + e], scale)
    for p in range(b.n_tokens):
        after = _target_values(g, run_frozen(run, features="fixed", drop_tokens=[p]))
        bad += _check(base - after, g.edges[:, b.n_features + b.n_errors + p], scale)
    return bad


def test_every_edge_equals_removing_its_source(setup):
    lm, run, g = setup
    b = g.blocks
    assert count_bad_edges(run, g) == 0
    # the graph is not trivial: most targets have many nonzero inputs, features reach the logits
    assert (g.edges != 0).sum() > 5 * g.edges.shape[0]
    assert g.edges[b.n_features:, :b.n_features].abs().sum() > 0


def test_frozen_and_live_worlds_reproduce_the_model(setup):
    lm, run, g = setup
    for world in (run_frozen(run), run_frozen(run, features="linear"), run_live(lm.model, run),
                  run_live(lm.model, run, features="linear")):
        assert torch.allclose(world.logits, run.logits, rtol=1e-5, atol=1e-5)
        for l, rec in run.transcoders.items():
            assert torch.allclose(world.activations[l], rec.f, rtol=1e-4, atol=1e-4)  # llama: float32 rotary


def test_total_effects_equal_ablations_in_the_linear_world(setup):
    lm, run, g = setup
    lin = run_frozen(run, features="linear")
    tok = g.logits.tokens[0]
    te = total_effects(g.edges, g.activations, g.blocks, 0)
    predicted = -g.activations * te
    measured = torch.tensor([
        demeaned_logit(run_frozen(run, [Intervention(int(l), int(i), int(p))], features="linear").logits,
                       g.logits.pos, tok) - demeaned_logit(lin.logits, g.logits.pos, tok)
        for l, p, i in g.features], dtype=torch.float64)
    assert torch.allclose(predicted, measured, rtol=1e-4, atol=1e-6)
    # indirect paths matter: total effects differ from the direct edges
    direct = -g.edges[g.blocks.n_features, :g.blocks.n_features]
    assert (predicted - direct).abs().max() > 1e-3 * direct.abs().max()


def test_a_budget_keeps_exact_edges_among_kept_nodes(setup):
    lm, run, full = setup
    small = build_attribution_graph(run, GraphConfig(max_feature_nodes=25, batch_size=4, update_interval=1))
    assert small.blocks.n_features == 25 and small.n_active == full.n_active
    idx = [full.feature_node(*(int(v) for v in c)) for c in small.features]
    F, Fs = full.blocks.n_features, small.blocks.n_features
    rows = idx + list(range(F, F + len(full.logits.tokens)))
    cols = idx + list(range(F, full.edges.shape[1]))
    assert torch.allclose(small.edges, full.edges[rows][:, cols], rtol=1e-10, atol=1e-12)
    # the kept features carry more influence (in the full graph) than a random 25 would on average
    infl = full.influence()[:F]
    assert float(infl[idx].mean()) > float(infl.mean())
    assert small.edges.shape == (Fs + len(small.logits.tokens), Fs + small.blocks.n_errors + small.seq_len)


def test_logit_nodes(setup):
    lm, run, g = setup
    probs = torch.softmax(run.logits[-1].double(), -1)
    top = probs.topk(10)
    assert g.logits.tokens == [int(t) for t in top.indices[:len(g.logits.tokens)]]
    assert torch.allclose(g.logits.weights, top.values[:len(g.logits.tokens)])
    few = choose_logits(run, GraphConfig(logit_mass=1e-6), run.seq_len - 1)
    assert few.tokens == [int(top.indices[0])]
    diff = build_attribution_graph(run, GraphConfig(max_feature_nodes=5), tokens=[3], minus=7, pos=4)
    assert diff.logits.weights.tolist() == [1.0]
    assert float(diff.values[-1]) == pytest.approx(float(run.logits[4, 3] - run.logits[4, 7]), rel=1e-9)
    with pytest.raises(ConfigError):
        choose_logits(run, GraphConfig(), 0, tokens=[3, 4], minus=7)
    with pytest.raises(ConfigError):
        build_attribution_graph(run, pos=run.seq_len)


def test_interventions_parse_and_apply():
    assert parse_intervention("8:355@37") == Intervention(8, 355, 37)
    assert parse_intervention("mlp8tc[355]@37*2") == Intervention(8, 355, 37, "scale", 2.0)
    assert parse_intervention("3:4=5.5") == Intervention(3, 4, None, "set", 5.5)
    for bad in ("8:355@", "x:1", "8:355*abc", "8:355=inf"):
        with pytest.raises(ConfigError):
            parse_intervention(bad)
    f = torch.ones(1, 3, 4)
    assert parse_intervention("0:1@2").apply(f)[0, :, 1].tolist() == [1.0, 1.0, 0.0]
    assert parse_intervention("0:1*3").apply(f)[0, :, 1].tolist() == [3.0, 3.0, 3.0]
    assert parse_intervention("0:2@0=-1").apply(f)[0, 0].tolist() == [1.0, 1.0, -1.0, 1.0]


def test_intervention_changes_downstream_features_in_both_worlds(setup):
    lm, run, g = setup
    l, p, i = (int(v) for v in g.features[0])
    iv = Intervention(l, i, p, "scale", 3.0)
    frozen = run_frozen(run, [iv])
    live = run_live(lm.model, run, [iv])
    assert float(frozen.activations[l][p, i]) == pytest.approx(3 * float(run.transcoders[l].f[p, i]))
    assert float(live.activations[l][p, i]) == pytest.approx(3 * float(run.transcoders[l].f[p, i]))
    later = max(run.transcoders)
    assert not torch.allclose(frozen.activations[later], run.transcoders[later].f)
    assert not torch.allclose(live.logits, frozen.logits)  # attention and norms respond only when live
    with pytest.raises(ConfigError):
        run_frozen(run, [Intervention(l, 10_000, p)])
    with pytest.raises(ConfigError):
        run_frozen(run, [Intervention(99, 0, p)])


def test_check_graph_is_exact_in_the_frozen_world_with_every_feature(setup):
    from mechfaith.circuits.graph_check import check_graph

    lm, run, g = setup
    check = check_graph(lm.model, run, g, n=8)
    assert len(check.features) == 8
    for f in check.features:
        assert f.frozen == pytest.approx(f.predicted, rel=1e-4, abs=1e-7)
    assert check.spearman["frozen"] == pytest.approx(1.0)
    assert check.median_rel_error["frozen"] < 1e-4
    infl = [f.influence for f in check.features]
    assert infl == sorted(infl, reverse=True)
    assert all(-1.0 <= check.spearman[w] <= 1.0 for w in ("frozen_nonlinear", "live_linear", "live"))


def test_memory_guard_refuses_before_any_work(setup):
    lm, run, g = setup
    with pytest.raises(ConfigError, match="max_memory_gb"):
        build_attribution_graph(run, GraphConfig(max_feature_nodes=0, max_memory_gb=1e-4))
    with pytest.raises(ConfigError):
        GraphConfig(max_memory_gb=0)
