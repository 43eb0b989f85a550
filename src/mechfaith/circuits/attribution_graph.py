"""Attribution graphs: the direct effects among all active features, errors, tokens and logits.

:func:`build_attribution_graph` takes a recorded prompt (:func:`~mechfaith.circuits.replacement.
record_run`, transcoders at any set of layers) and returns an :class:`AttributionGraph`:

- **logit nodes**: the top predictions at the target position until their probabilities reach
  ``logit_mass`` (at most ``max_logits``), or chosen tokens, or one logit difference. A logit node
  is the *demeaned* logit ``logit_t - mean_v logit_v`` (as circuit-tracer's), weighted by its
  probability in the influence computation (a difference gets weight 1).
- **feature nodes**: the active features with the largest influence on the logits, at most
  ``max_feature_nodes`` of them. Rows are computed in batches (:class:`~mechfaith.circuits.
  graph_rows.RowEngine`): first the logits', then, every ``update_interval`` batches, the not yet
  computed features are ranked by their influence through the rows known so far and the best are
  computed next (circuit-tracer's partial-influence order). Features whose rows are not computed
  are left out of the graph, with their edges.
- **error nodes** (one per layer and position) and **token nodes** (one per position) are sources
  only.

Memory is the rows computed so far, ``(max_feature_nodes + K) x (active features + (n_layers + 1)
x seq)`` numbers, linear in the prompt length at a fixed budget; the final graph keeps
``edges [F + K, F + E + T]`` (:mod:`~mechfaith.circuits.graph_scores`), never a square matrix of
every node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from mechfaith.circuits.attribution import Attributor, Probe
from mechfaith.circuits.graph_rows import RowEngine
from mechfaith.circuits.graph_scores import (
    Blocks,
    GraphScores,
    Pruned,
    graph_scores,
    node_influence,
    normalize_rows,
    propagate,
    prune,
)
from mechfaith.circuits.replacement import ReplacementRun
from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError

Progress = Callable[[int, int], None]  # (feature rows done, feature rows planned)


@dataclass
class GraphConfig:
    """What an attribution graph holds and how it is pruned."""

    max_feature_nodes: int = doc("Feature nodes at most (the most influential; 0: every active feature).", 1000)
    max_logits: int = doc("Logit nodes at most (the model's top predictions).", 10)
    logit_mass: float = doc("Add top predictions until their probabilities sum to this.", 0.95)
    batch_size: int = doc("Targets per backward sweep.", 64)
    update_interval: int = doc("Batches between re-rankings of the features by influence.", 4)
    node_threshold: float = doc("Pruning keeps the nodes carrying this share of the influence.", 0.8)
    edge_threshold: float = doc("Pruning keeps the edges carrying this share of the influence.", 0.98)
    max_memory_gb: float = doc("Refuse a graph whose rows would take more memory than this (estimated: three "
                               "copies of the rows computed, for the influence ranking).", 16.0)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.max_feature_nodes < 0 or self.max_logits < 1 or self.batch_size < 1 or self.update_interval < 1:
            raise ConfigError("GraphConfig: max_feature_nodes >= 0, max_logits, batch_size and "
                              "update_interval >= 1")
        if not self.max_memory_gb > 0:
            raise ConfigError(f"GraphConfig: max_memory_gb must be > 0, got {self.max_memory_gb}")
        for name in ("logit_mass", "node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"GraphConfig: {name} must be in (0, 1], got {v}")


@dataclass
class LogitTargets:
    """The logit nodes: token ids at one position (``minus`` >= 0: one logit difference)."""

    pos: int
    tokens: list[int]
    probabilities: Tensor  # [K] the model's probabilities of the tokens
    weights: Tensor  # [K] their weights in the influence computation
    minus: int = -1

    def label(self, k: int) -> str:
        return f"logit[{self.tokens[k]}]@{self.pos}" if self.minus < 0 else \
            f"logit[{self.tokens[k]}-{self.minus}]@{self.pos}"


@dataclass
class AttributionGraph:
    """An attribution graph on one prompt (node order: features, errors, tokens, logits)."""

    tokens: list[int]
    token_strings: list[str] | None
    n_layers: int
    features: Tensor  # [F, 3] (layer, pos, index) of the feature nodes
    activations: Tensor  # [F]
    logits: LogitTargets
    edges: Tensor  # [F + K, F + E + T] direct effects (rows: targets, columns: sources)
    values: Tensor  # [F + K] the targets' values (pre-activations, demeaned logits)
    n_active: int  # active features on the prompt (nodes or not)
    config: GraphConfig
    feature_share: list[float] = field(default_factory=list)  # per logit: |direct| share from all active features
    seconds: float = 0.0
    _influence: Tensor | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return len(self.tokens)

    @property
    def blocks(self) -> Blocks:
        return Blocks(int(self.features.shape[0]), self.n_layers * self.seq_len, self.seq_len,
                      len(self.logits.tokens))

    @property
    def bias(self) -> Tensor:
        """Per target: its value minus the sum of its incoming edges (all constant terms) [F + K]."""
        return self.values - self.edges.sum(-1)

    def influence(self) -> Tensor:
        """Influence of every node on the weighted logits [n_nodes]."""
        if self._influence is None:
            self._influence = node_influence(self.edges, self.logits.weights.to(self.edges.dtype), self.blocks)
        return self._influence

    def scores(self) -> GraphScores:
        return graph_scores(self.edges, self.logits.weights.to(self.edges.dtype), self.blocks)

    def prune(self) -> Pruned:
        return prune(self.edges, self.logits.weights.to(self.edges.dtype), self.blocks,
                     self.config.node_threshold, self.config.edge_threshold)

    def node_kind(self, i: int) -> str:
        b = self.blocks
        if i < b.n_features:
            return "feature"
        if i < b.n_features + b.n_errors:
            return "error"
        return "token" if i < b.n_sources else "logit"

    def node_name(self, i: int) -> str:
        """Names as :mod:`~mechfaith.circuits.nodes` writes them (``mlp8tc[355]@37``, ``mlp3err@37``,
        ``emb@37``, ``logit[464]@37``)."""
        b = self.blocks
        kind = self.node_kind(i)
        if kind == "feature":
            l, p, f = (int(v) for v in self.features[i])
            return f"mlp{l}tc[{f}]@{p}"
        if kind == "error":
            l, p = divmod(i - b.n_features, self.seq_len)
            return f"mlp{l}err@{p}"
        if kind == "token":
            return f"emb@{i - b.n_features - b.n_errors}"
        return self.logits.label(i - b.n_sources)

    def feature_node(self, layer: int, pos: int, index: int) -> int:
        """Node index of feature ``(layer, pos, index)``; a ConfigError if it is not in the graph."""
        want = torch.tensor([layer, pos, index])
        hit = (self.features == want).all(-1).nonzero()
        if len(hit) == 0:
            raise ConfigError(f"mlp{layer}tc[{index}]@{pos} is not a node of the graph")
        return int(hit[0, 0])


def choose_logits(run: ReplacementRun, cfg: GraphConfig, pos: int, tokens: list[int] | None = None,
                  minus: int = -1) -> LogitTargets:
    """The logit nodes at ``pos``: chosen ``tokens`` (with ``minus``: one difference) or the top ones."""
    probs = torch.softmax(run.logits[pos].double(), -1)
    vocab = probs.shape[0]
    if tokens:
        for t in [*tokens, minus] if minus >= 0 else tokens:
            if not 0 <= t < vocab:
                raise ConfigError(f"token {t} is out of range: the vocabulary has {vocab} tokens")
        if minus >= 0 and len(tokens) != 1:
            raise ConfigError("a logit difference takes one token and one --minus token")
        p = probs[torch.tensor(tokens, device=probs.device)].cpu()
        w = torch.ones(1, dtype=p.dtype) if minus >= 0 else p
        return LogitTargets(pos, list(tokens), p, w, minus)
    top_p, top_i = probs.topk(min(cfg.max_logits, vocab))
    top_p = top_p.cpu()
    n = min(int(torch.searchsorted(top_p.cumsum(0), torch.tensor(cfg.logit_mass, dtype=top_p.dtype))) + 1,
            len(top_p))
    return LogitTargets(pos, [int(t) for t in top_i[:n]], top_p[:n], top_p[:n])


def _logit_probes(run: ReplacementRun, logits: LogitTargets) -> tuple[list[Probe], Tensor]:
    parts = run.parts
    W_U = parts.W_U
    probes, values = [], []
    for t in logits.tokens:
        if logits.minus >= 0:
            e = W_U[t] - W_U[logits.minus]
            v = run.logits[logits.pos, t] - run.logits[logits.pos, logits.minus]
        else:
            e = W_U[t] - W_U.mean(0)
            v = run.logits[logits.pos, t] - run.logits[logits.pos].mean()
        probes.append(Probe(2 * run.n_layers, logits.pos, parts.ln_final.read_vector(e, run.s_final[logits.pos]), 0.0))
        values.append(v)
    return probes, torch.stack(values).to(run.resid.dtype)


def build_attribution_graph(run: ReplacementRun, cfg: GraphConfig | None = None, *, pos: int = -1,
                            tokens: list[int] | None = None, minus: int = -1,
                            progress: Progress | None = None) -> AttributionGraph:
    """The attribution graph of the logits at ``pos`` (negative: from the end) of a recorded run."""
    cfg = cfg or GraphConfig()
    t0 = time.perf_counter()
    p = pos + run.seq_len if pos < 0 else pos
    if not 0 <= p < run.seq_len:
        raise ConfigError(f"position {pos} is out of range for a prompt of {run.seq_len} tokens")
    engine = RowEngine(run)
    active = engine.active
    A, S = active.count, engine.n_sources
    logits = choose_logits(run, cfg, p, tokens, minus)
    K = len(logits.tokens)
    budget = A if cfg.max_feature_nodes == 0 else min(cfg.max_feature_nodes, A)
    need = 3 * (K + budget) * S * run.resid.element_size() / 1e9
    if need > cfg.max_memory_gb:
        raise ConfigError(f"a graph of {budget} feature nodes over {S} sources ({A} active features) needs about "
                          f"{need:.1f} GB (max_memory_gb {cfg.max_memory_gb:g}): lower max_feature_nodes "
                          f"(0 means all {A}) or raise max_memory_gb")
    attributor = Attributor(run)
    dev = run.resid.device  # the rows are computed where the run is; the graph is returned on the CPU
    store = torch.zeros(K + budget, S, dtype=run.resid.dtype, device=dev)
    row_node = torch.zeros(K + budget, dtype=torch.long, device=dev)
    probes, logit_values = _logit_probes(run, logits)
    store[:K] = engine.rows(probes)
    direct = store[:K].abs()
    feature_share = (direct[:, :A].sum(-1) / direct.sum(-1).clamp_min(1e-30)).tolist()
    row_node[:K] = torch.arange(S, S + K, device=dev)
    visited = torch.zeros(A, dtype=torch.bool, device=dev)
    start = torch.zeros(S + K, dtype=store.dtype, device=dev)
    start[S:] = logits.weights.to(dev, store.dtype)
    st = K
    while st - K < budget:
        if budget == A:
            pending = torch.arange(A, device=dev)
        else:
            infl = propagate(normalize_rows(store[:st]), row_node[:st], start, S + K)[:A]
            rank = torch.argsort(infl, descending=True)
            pending = rank[~visited[rank]][:min(cfg.update_interval * cfg.batch_size, budget - (st - K))]
        pending = pending[torch.argsort(active.coords[pending, 1], stable=True)]  # similar positions batch well
        for chunk in pending.split(cfg.batch_size):
            feats = [attributor.feature_probe(int(active.coords[j, 0]), int(active.coords[j, 2]),
                                              int(active.coords[j, 1])) for j in chunk]
            n = len(chunk)
            store[st:st + n] = engine.rows(feats)
            row_node[st:st + n] = chunk
            visited[chunk] = True
            st += n
            if progress is not None:
                progress(st - K, budget)
    selected = visited.nonzero(as_tuple=True)[0]  # in (layer, pos, index) order
    order = torch.argsort(row_node[K:st])  # feature rows in node order
    rows = torch.cat([store[K:st][order], store[:K]])
    cols = torch.cat([selected, torch.arange(A, S, device=dev)])
    coords = active.coords[selected]
    pre = torch.stack([run.transcoders[int(l)].pre[int(q), int(i)] for l, q, i in coords]) if len(coords) \
        else torch.zeros(0, dtype=store.dtype, device=dev)
    return AttributionGraph(
        tokens=[int(t) for t in run.tokens], token_strings=run.token_strings, n_layers=run.n_layers,
        features=coords.cpu(), activations=active.values[selected].cpu(), logits=logits,
        edges=rows[:, cols].contiguous().cpu(), values=torch.cat([pre.to(store.dtype), logit_values.to(dev)]).cpu(),
        n_active=A, config=cfg,
        feature_share=feature_share, seconds=time.perf_counter() - t0)
