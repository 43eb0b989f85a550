"""Influence, scores and pruning on hand-built graphs with values worked out by hand, and influence
against a brute-force matrix inverse of the square adjacency on random acyclic graphs."""

from __future__ import annotations

import pytest
import torch

from mechfaith.circuits.graph_scores import Blocks, graph_scores, node_influence, prune, threshold_for_share, total_effects
from mechfaith.errors import ConfigError

# nodes: f0, f1 (features), e0 (error), t0 (token), L (logit); columns f0 f1 e0 t0; rows f0 f1 L
HAND = torch.tensor([[0.0, 0.0, 1.0, 3.0],    # f0 <- e0 (1), t0 (3)
                     [2.0, 0.0, 0.0, -2.0],   # f1 <- f0 (2), t0 (-2)
                     [1.0, -3.0, 0.0, 0.0]],  # L  <- f0 (1), f1 (-3)
                    dtype=torch.float64)
BLOCKS = Blocks(2, 1, 1, 1)
W = torch.tensor([1.0], dtype=torch.float64)


def test_influence_by_hand():
    # L -> f0 .25, f1 .75; f1 (.75) -> f0 .375, t0 .375; f0 (.25 + .375) -> e0 .25 x .625, t0 .75 x .625
    infl = node_influence(HAND, W, BLOCKS)
    assert infl.tolist() == pytest.approx([0.625, 0.75, 0.15625, 0.84375, 0.0])


def test_scores_by_hand():
    s = graph_scores(HAND, W, BLOCKS)
    assert s.replacement_score == pytest.approx(0.84375 / (0.84375 + 0.15625))
    # non-error shares: f0 .75, others 1; weights infl + w: .625, .75, .15625, .84375, 1
    assert s.completeness_score == pytest.approx((0.75 * 0.625 + 0.75 + 0.15625 + 0.84375 + 1) / 3.375)
    no_error = HAND.clone()
    no_error[:, 2] = 0
    s2 = graph_scores(no_error, W, BLOCKS)
    assert s2.replacement_score == 1.0 and s2.completeness_score == pytest.approx(1.0)


def test_pruning_by_hand():
    # node influences .84375 (t0), .75 (f1), .625 (f0), .15625 (e0): 80 % needs the first three
    p = prune(HAND, W, BLOCKS, node_threshold=0.8, edge_threshold=0.98)
    assert p.node_mask.tolist() == [True, True, False, True, True]
    assert p.edge_mask.tolist() == [[False, False, False, True], [True, False, False, True], [True, True, False, False]]
    # edge scores .75 (L<-f1), .625 (f0<-t0), .375, .375, .25 (L<-f0): 85 % drops the last
    p2 = prune(HAND, W, BLOCKS, node_threshold=0.8, edge_threshold=0.85)
    assert not bool(p2.edge_mask[2, 0]) and int(p2.edge_mask.sum()) == 4
    # a feature without a kept incoming edge goes, and then its outgoing edges
    p3 = prune(HAND, W, BLOCKS, node_threshold=0.5, edge_threshold=0.98)
    assert p3.node_mask.tolist() == [False, True, False, True, True]
    assert not bool(p3.edge_mask[:, 0].any()) and not bool(p3.edge_mask[0].any())
    with pytest.raises(ConfigError):
        prune(HAND, W, BLOCKS, node_threshold=1.5)


def test_threshold_for_share():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert threshold_for_share(s, 0.4) == 4.0
    assert threshold_for_share(s, 0.5) == 3.0
    assert threshold_for_share(s, 1.0) == 1.0
    assert threshold_for_share(torch.zeros(3), 0.5) == float("inf")


def _random_graph(seed: int, F=7, E=4, T=3, K=2):
    g = torch.Generator().manual_seed(seed)
    b = Blocks(F, E, T, K)
    edges = torch.randn(F + K, b.n_sources, generator=g, dtype=torch.float64)
    edges[:F, :F] = torch.tril(edges[:F, :F], -1)  # feature i only reads features j < i
    edges *= torch.rand(edges.shape, generator=g, dtype=torch.float64) < 0.6
    return edges, b, torch.rand(K, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_influence_equals_brute_force_inverse(seed):
    edges, b, w = _random_graph(seed)
    n = b.n_nodes
    square = torch.zeros(n, n, dtype=torch.float64)  # [target, source]
    rows = b.row_nodes()
    a = edges.abs()
    square[rows, :b.n_sources] = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    start = torch.zeros(n, dtype=torch.float64)
    start[b.n_sources:] = w
    brute = start @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - square) - torch.eye(n, dtype=torch.float64))
    assert torch.allclose(node_influence(edges, w, b), brute, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_total_effects_equal_brute_force_inverse(seed):
    edges, b, w = _random_graph(seed)
    F = b.n_features
    act = torch.rand(F, dtype=torch.float64) + 0.5
    jac = edges[:, :F] / act
    want = jac[F + 1] @ torch.linalg.inv(torch.eye(F, dtype=torch.float64) - jac[:F])
    assert torch.allclose(total_effects(edges, act, b, 1), want, atol=1e-12)


def test_shape_checks():
    with pytest.raises(ConfigError):
        node_influence(HAND[:, :3], W, BLOCKS)
    with pytest.raises(ConfigError):
        node_influence(HAND, torch.ones(2, dtype=torch.float64), BLOCKS)
    cyclic = HAND.clone()
    cyclic[0, 1] = 1.0  # f0 <- f1 <- f0
    with pytest.raises(ConfigError, match="cycle"):
        node_influence(cyclic, W, BLOCKS)
