"""Influence, pruning and the two scores of an attribution graph, on its rectangular edge matrix.

An attribution graph (:mod:`mechfaith.circuits.attribution_graph`) has four kinds of nodes, in this
order: F feature nodes, E error nodes, T token nodes and K logit nodes. Only features and logits
have incoming edges, so the graph is stored as ``edges [F + K, F + E + T]``: row ``r`` is a target
(the F features, then the K logits), column ``c`` a source (the F features, the E errors, the T
tokens), ``edges[r, c]`` the direct effect of source ``c`` on target ``r``. Node ``i`` of the
feature block is both row ``i`` and column ``i``. Nothing here ever builds the square
(F + E + T + K)^2 matrix that circuit-tracer's ``Graph.adjacency_matrix`` is.

Definitions (those of circuit-tracer's ``circuit_tracer/graph.py``, read with ``search``):

- **normalised edges** ``N = |edges| / rowsum(|edges|)`` (each target's incoming weights sum to 1;
  a row of zeros stays zero).
- **influence** of node ``j`` on the logits: ``w N + w N^2 + ...`` restricted to ``j``, with ``w``
  the logit weights (probabilities of the target logits) on the logit rows: the share of the
  logits' (normalised, absolute) input that reaches ``j`` along all paths. The series is finite:
  the graph is acyclic (a target only has sources upstream of it).
- **replacement score**: ``token influence / (token influence + error influence)``: the share of
  the end-to-end influence from the input that does not pass through an error node.
- **completeness score**: ``sum_j (1 - error share of j's inputs) (influence_j + w_j) /
  sum_j (influence_j + w_j)``: each node's share of inputs that come from features or tokens rather
  than errors, weighted by its influence on the output (partial credit for mostly-explained nodes).
  Error and token nodes have no inputs and count as fully explained (as in circuit-tracer).
- **pruning**: keep the nodes that together carry ``node_threshold`` of the total influence (tokens
  and logits always kept), then the edges that carry ``edge_threshold`` of the edge influence
  (``N[r, c] * (influence_r + w_r)`` computed on the node-pruned graph), then drop, repeatedly,
  features and errors left without outgoing edges and features left without incoming edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechfaith.errors import ConfigError


@dataclass(frozen=True)
class Blocks:
    """Sizes of the node blocks: features, errors, tokens, logits."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def n_sources(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.n_sources + self.n_logits

    @property
    def n_targets(self) -> int:
        return self.n_features + self.n_logits

    def row_nodes(self) -> Tensor:
        """Node index of each row (features, then logits)."""
        return torch.cat([torch.arange(self.n_features),
                          torch.arange(self.n_sources, self.n_nodes)])

    def check(self, edges: Tensor, logit_weights: Tensor) -> None:
        if tuple(edges.shape) != (self.n_targets, self.n_sources):
            raise ConfigError(f"edge matrix of shape {tuple(edges.shape)}; blocks {self} need "
                              f"({self.n_targets}, {self.n_sources})")
        if tuple(logit_weights.shape) != (self.n_logits,):
            raise ConfigError(f"{self.n_logits} logits but {tuple(logit_weights.shape)} logit weights")


def normalize_rows(edges: Tensor) -> Tensor:
    """``|edges|`` with every row scaled to sum to 1 (zero rows stay zero)."""
    a = edges.abs()
    return a.div_(a.sum(-1, keepdim=True).clamp_min(1e-30))  # in place: one copy of a large matrix, not two


def propagate(normalized: Tensor, row_nodes: Tensor, start: Tensor, n_nodes: int) -> Tensor:
    """``sum_{k>=1} start N^k`` over nodes for a rectangular ``N`` whose row ``r`` is node
    ``row_nodes[r]`` and whose column ``c`` is node ``c``; ``start`` [n_nodes]. In an acyclic graph
    no path has more than ``n_rows`` edges; a longer one means a cycle (a ConfigError)."""
    n_src = normalized.shape[1]
    total = torch.zeros(n_nodes, dtype=normalized.dtype, device=normalized.device)
    cur = start.to(normalized.dtype)
    for _ in range(normalized.shape[0] + 1):
        nxt = torch.zeros_like(total)
        nxt[:n_src] = cur[row_nodes] @ normalized
        if not bool(nxt.any()):
            return total
        total += nxt
        cur = nxt
    raise ConfigError("influence did not converge: the edge matrix has a cycle")


def logit_start(blocks: Blocks, logit_weights: Tensor) -> Tensor:
    w = torch.zeros(blocks.n_nodes, dtype=logit_weights.dtype, device=logit_weights.device)
    w[blocks.n_sources:] = logit_weights
    return w


def node_influence(edges: Tensor, logit_weights: Tensor, blocks: Blocks) -> Tensor:
    """Influence of every node on the weighted logits [n_nodes] (zero on the logits themselves)."""
    blocks.check(edges, logit_weights)
    w = logit_start(blocks, logit_weights.to(edges.dtype))
    return propagate(normalize_rows(edges), blocks.row_nodes().to(edges.device), w, blocks.n_nodes)


@dataclass
class GraphScores:
    """The two scores of a graph (see the module docstring)."""

    replacement_score: float
    completeness_score: float


def graph_scores(edges: Tensor, logit_weights: Tensor, blocks: Blocks) -> GraphScores:
    """Replacement and completeness scores, as circuit-tracer defines them."""
    infl = node_influence(edges, logit_weights, blocks)
    F, E = blocks.n_features, blocks.n_errors
    err = infl[F:F + E].sum()
    tok = infl[F + E:blocks.n_sources].sum()
    replacement = float(tok / (tok + err)) if float(tok + err) > 0 else 0.0
    norm = normalize_rows(edges)
    non_error = torch.ones(blocks.n_nodes, dtype=edges.dtype, device=edges.device)
    non_error[blocks.row_nodes().to(edges.device)] = 1 - norm[:, F:F + E].sum(-1)
    weight = infl + logit_start(blocks, logit_weights.to(edges.dtype))
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-30))
    return GraphScores(replacement, completeness)


def threshold_for_share(scores: Tensor, share: float) -> float:
    """The smallest score among the largest scores that together make ``share`` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = s.sum()
    if s.numel() == 0 or float(total) <= 0:
        return float("inf")
    cum = s.cumsum(0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype, device=cum.device))),
            s.numel() - 1)
    return float(s[i])


@dataclass
class Pruned:
    """What pruning keeps: ``node_mask`` [n_nodes], ``edge_mask`` [n_targets, n_sources] and
    ``influence`` [n_nodes] (of the unpruned graph)."""

    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor


def prune(edges: Tensor, logit_weights: Tensor, blocks: Blocks, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> Pruned:
    """Prune the graph to the nodes and edges carrying the given shares of influence."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    F, S = blocks.n_features, blocks.n_sources
    rows = blocks.row_nodes().to(edges.device)
    infl = node_influence(edges, logit_weights, blocks)
    keep = infl >= threshold_for_share(infl, node_threshold)
    keep[F + blocks.n_errors:] = True  # tokens and logits
    pruned = edges * keep[rows][:, None] * keep[:S][None, :]
    norm = normalize_rows(pruned)
    w = logit_start(blocks, logit_weights.to(edges.dtype))
    p_infl = propagate(norm, rows, w, blocks.n_nodes) + w
    edge_scores = norm * p_infl[rows][:, None]
    edge_mask = edge_scores >= threshold_for_share(edge_scores, edge_threshold)
    edge_mask &= pruned != 0
    while True:
        before = keep.clone()
        edge_mask &= keep[rows][:, None] & keep[:S][None, :]
        has_out = edge_mask.any(0)  # [S]
        keep[:F + blocks.n_errors] &= has_out[:F + blocks.n_errors]
        keep[:F] &= edge_mask[:F].any(1)
        if bool((keep == before).all()):
            break
    return Pruned(keep, edge_mask, infl)


def total_effects(edges: Tensor, activations: Tensor, blocks: Blocks, logit_row: int) -> Tensor:
    """The graph's prediction of ``d logit / d activation`` of every feature [F] (signed, all paths),
    where each feature responds to its inputs with slope 1 (an active ReLU / TopK / JumpReLU latent)
    and errors and tokens are fixed; ``logit_row`` in [0, K). Removing feature ``j`` changes the
    logit by ``-activations[j] * total_effects[j]`` in that linearised model."""
    F = blocks.n_features
    act = activations.to(edges.dtype)
    safe = torch.where(act != 0, act, torch.ones_like(act))
    jac = edges[:, :F] / safe[None, :]  # d target / d activation of each source feature
    y = jac[F + logit_row].clone()
    cur = y.clone()
    for _ in range(F + 1):
        cur = cur @ jac[:F]
        if not bool(cur.any()):
            return y
        y += cur
    raise ConfigError("total effects did not converge: the edge matrix has a cycle")
