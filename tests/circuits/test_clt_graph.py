"""Attribution graphs of cross-layer transcoders (tiny random GPT-2 and Llama, float64).

- every edge (CLT features that write to several layers, errors, tokens) equals the change of its
  target when its source is removed in the frozen linearised model (:func:`run_frozen`, an explicit
  forward that adds each feature's cross-layer writes where they land);
- the frozen and live worlds reproduce the model's logits;
- a reach-0 CLT gives exactly the graph of the per-layer transcoder set it holds.
"""

from __future__ import annotations

import math

import pytest
import torch

from mechfaith.circuits.attribution import Attributor
from mechfaith.circuits.attribution_graph import GraphConfig, build_attribution_graph
from mechfaith.circuits.graph import build_graph, check_completeness
from mechfaith.circuits.interventions import Intervention, run_frozen, run_live
from mechfaith.circuits.nodes import Node
from mechfaith.circuits.replacement import Transcoder, clt_transcoders, record_run
from mechfaith.circuits.search import SearchConfig, search_paths
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from tests.circuits.test_attribution_graph import count_bad_edges
from tests.circuits.test_circuits_attribution import N_LAYERS, make_setup


def _clt(reach: int | None, activation: str = "relu") -> CrossLayerTranscoder:
    cfg = CLTConfig(n_layers=N_LAYERS, d_in=32, n_latents=24, reach=reach, activation=activation, k=8, skip=True,
                    jumprelu_threshold=0.1)
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        clt.W_enc.mul_(3.0)
        clt.b_enc.normal_(0, 0.2, generator=g)
        clt.W_skip.normal_(0, 0.1, generator=g)  # type: ignore[union-attr]
        clt.b_dec.normal_(0, 0.1, generator=g)
    return clt


@pytest.fixture(scope="module", params=[("gpt2", "relu"), ("llama", "jumprelu"), ("gpt2", "topk")])
def setup(request):
    family, activation = request.param
    lm, _, ids = make_setup(family, ("mlp_in",) * N_LAYERS)
    run = record_run(lm.model, ids, clt_transcoders(_clt(None, activation)))
    graph = build_attribution_graph(run, GraphConfig(max_feature_nodes=0, batch_size=5))
    return lm, run, graph


def test_every_clt_edge_equals_removing_its_source(setup):
    lm, run, g = setup
    b = g.blocks
    assert run.transcoders[0].cross and set(run.transcoders[0].cross) == {1, 2}
    assert count_bad_edges(run, g, rtol=1e-5) == 0  # llama: rotary in float32 (1.2e-6 seen)
    # layer-0 features have direct edges to the logits (their writes at layers 0, 1 and 2)
    layer0 = (g.features[:, 0] == 0).nonzero().flatten()
    assert g.edges[b.n_features:, layer0].abs().sum() > 0


def test_worlds_reproduce_the_model_with_a_clt(setup):
    lm, run, g = setup
    for world in (run_frozen(run), run_frozen(run, features="linear"), run_live(lm.model, run),
                  run_live(lm.model, run, features="linear")):
        assert torch.allclose(world.logits, run.logits, rtol=1e-5, atol=1e-5)
        for l, rec in run.transcoders.items():
            assert torch.allclose(world.activations[l], rec.f, rtol=1e-4, atol=1e-4)
    # an ablation in the live world moves later layers through the cross writes too
    l, p, i = (int(v) for v in g.features[0])
    live = run_live(lm.model, run, [Intervention(l, i, p)])
    assert not torch.allclose(live.logits, run.logits, atol=1e-9)


@pytest.mark.parametrize("family,activation", [("gpt2", "relu"), ("llama", "jumprelu")])
def test_greedy_paths_of_a_clt_equal_the_graphs_edges_and_are_complete(family: str, activation: str):
    """``mechfaith circuit`` on a CLT. With the attention's output projections and the skips zeroed (a
    graph edge, a direct effect through frozen attention and skips, is then the residual-stream write
    alone, which is what a greedy child's attribution is), each feature
    child's attribution equals the graph's edge (verified by intervention above); every expanded node's
    children + error + bias + pruned sum to its value; layer-0 features reach a layer-2 root through
    their cross writes."""
    lm, _, ids = make_setup(family, ("mlp_in",) * N_LAYERS)
    with torch.no_grad():
        for l in range(N_LAYERS):
            for name, p in lm.adapter.attention(l).named_parameters():
                if "c_proj" in name or "o_proj" in name:
                    p.zero_()
    clt = _clt(None, activation)
    with torch.no_grad():
        clt.W_skip.zero_()  # type: ignore[union-attr]  # a skip, too, is inside a graph edge
    run = record_run(lm.model, ids, clt_transcoders(clt))
    g = build_attribution_graph(run, GraphConfig(max_feature_nodes=0, batch_size=8))
    last = run.seq_len - 1
    f = run.transcoders[2].f[last]
    idx = int(f.argmax())
    assert f[idx] > 0
    result = search_paths(Attributor(run), Node("feature", last, 2, idx), SearchConfig(depth=2, beam=12))
    assert math.isclose(result.root_value, float(run.transcoders[2].pre[last, idx]), rel_tol=1e-6)
    row = g.feature_node(2, last, idx)
    scale = abs(result.root_value) + max(abs(o.attribution) for o in result.occurrences)
    layers = set()
    for o in result.occurrences[1:]:
        if o.parent == 0 and o.node.kind == "feature":
            edge = float(g.edges[row, g.feature_node(o.node.layer, o.node.pos, o.node.index)])
            assert math.isclose(o.attribution, edge, rel_tol=1e-6, abs_tol=1e-9 * scale), (o.name, edge)
            layers.add(o.node.layer)
    assert 0 in layers
    for o in result.occurrences:
        if o.expanded:
            b = o.breakdown
            assert math.isclose(b["kept"] + b["tc_error"] + b["bias"] + b["pruned"], o.attribution,
                                rel_tol=1e-6, abs_tol=1e-9 * scale)
    assert check_completeness(build_graph(result, n_layers=N_LAYERS, tokens=run.tokens.tolist()), rtol=1e-6) == []


def test_a_reach_zero_clt_graph_is_the_per_layer_sets_graph():
    lm, _, ids = make_setup("gpt2", ("mlp_in",) * N_LAYERS)
    clt = _clt(0)
    as_clt = clt_transcoders(clt)
    assert all(not t.cross for t in as_clt.values())
    plain = {l: Transcoder(l, clt.layer_coder(l), "mlp_in", "mlp_out") for l in range(N_LAYERS)}
    g1 = build_attribution_graph(record_run(lm.model, ids, as_clt), GraphConfig(max_feature_nodes=0))
    g2 = build_attribution_graph(record_run(lm.model, ids, plain), GraphConfig(max_feature_nodes=0))
    assert torch.equal(g1.features, g2.features)
    torch.testing.assert_close(g1.edges, g2.edges, rtol=0, atol=1e-12)
    # a full CLT's graph differs (its layer-0 features also write to layers 1 and 2)
    g3 = build_attribution_graph(record_run(lm.model, ids, clt_transcoders(_clt(None))), GraphConfig(max_feature_nodes=0))
    assert g3.edges.shape != g1.edges.shape or not torch.allclose(g3.edges, g1.edges)


def test_logit_effects_and_pullbacks_of_a_clt_feature_sum_its_writes():
    from mechfaith.circuits.parts import model_parts
    from mechfaith.circuits.pullback import logit_effects, pullback, read_direction

    lm, _, _ = make_setup("gpt2", ("mlp_in",) * N_LAYERS)
    parts = model_parts(lm.adapter)
    clt = _clt(None)
    tcs = clt_transcoders(clt)
    per_layer = {l: Transcoder(l, clt.layer_view(l), "mlp_in", "mlp_out") for l in range(N_LAYERS)}
    unit = logit_effects(parts, Transcoder(0, clt.layer_view(0)), 3)  # own-layer write only
    both = logit_effects(parts, tcs[0], 3)
    rest = sum(logit_effects(parts, Transcoder(0, _with_decoder(clt, 0, t)), 3) for t in (1, 2))
    torch.testing.assert_close(both, unit + rest)
    # a layer-0 feature reaches layer 2's reader through its writes to layers 0 and 1, not 2
    v = read_direction(parts, tcs[2], 5).to(torch.float64)
    want = (clt.decoder_to(0, 0) + clt.decoder_to(0, 1)).detach() @ v
    torch.testing.assert_close(pullback(parts, tcs[2], 5, tcs[0]), want)
    assert not torch.allclose(pullback(parts, per_layer[2], 5, per_layer[0]), want)


def _with_decoder(clt: CrossLayerTranscoder, source: int, target: int):
    c = clt.layer_view(source)
    with torch.no_grad():
        c.W_dec.copy_(clt.decoder_to(source, target))
    return c
