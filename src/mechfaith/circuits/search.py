"""Greedy path search: from a root (a feature or a logit at a token), expand the children with the
largest attributions, keep a beam, repeat to a set depth.

The search builds a tree of *occurrences* (a node reached along one path from the root). At each
depth all children of every expandable occurrence on the frontier are scored together and the
``beam`` largest by ``|attribution|`` are kept (as in the transcoder circuit-analysis paper: k
paths -> k^2 candidates -> the best k). Leaves (embeddings, errors, opaque MLPs) end their path.
Every expanded occurrence records how its attribution splits: ``kept`` (its kept children),
``tc_error`` (transcoder-error children not kept), ``bias`` (constants) and ``pruned`` (all other
children not kept); the four sum to its attribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mechfaith.circuits.attribution import Attributor, Probe
from mechfaith.circuits.nodes import Node
from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError


@dataclass
class SearchConfig:
    """How far and how wide the greedy path search goes."""

    depth: int = doc("Path length (edges from the root).", 3)
    beam: int = doc("Paths kept at each depth (the best by |attribution|).", 15)
    per_node: int = doc("At most this many children of one node per depth (0: no limit).", 0)
    min_abs: float = doc("Ignore children with |attribution| below this.", 0.0)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.depth < 1 or self.beam < 1 or self.per_node < 0 or self.min_abs < 0:
            raise ConfigError("SearchConfig: depth and beam must be >= 1, per_node and min_abs >= 0")


@dataclass
class Occurrence:
    """One node reached along one path from the root."""

    id: int
    node: Node
    parent: int | None
    attribution: float  # contribution to the root along this path (root units)
    depth: int
    probe: Probe | None = field(default=None, repr=False)
    children: list[int] = field(default_factory=list)
    expanded: bool = False
    breakdown: dict[str, float] | None = None  # kept / tc_error / bias / pruned, for expanded ones
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class PathResult:
    """A path from the root to a node; its attribution is that of its last node."""

    nodes: list[str]
    attribution: float

    def __str__(self) -> str:
        return " <- ".join(self.nodes) + f": {self.attribution:.4g}"


@dataclass
class SearchResult:
    root: Node
    root_value: float
    occurrences: list[Occurrence]
    paths: list[PathResult]
    config: SearchConfig

    def path_of(self, occ_id: int) -> list[Occurrence]:
        chain = []
        o: int | None = occ_id
        while o is not None:
            chain.append(self.occurrences[o])
            o = self.occurrences[o].parent
        return chain[::-1]


def search_paths(attributor: Attributor, root: Node, cfg: SearchConfig | None = None) -> SearchResult:
    """Greedy beam search for the paths with the largest attributions into ``root``."""
    cfg = cfg or SearchConfig()
    probe = attributor.root_probe(root)
    value = attributor.value(probe)
    occs = [Occurrence(0, root, None, value, 0, probe, info=attributor.node_info(root))]
    frontier = [0]
    for depth in range(1, cfg.depth + 1):
        expand = [i for i in frontier if occs[i].probe is not None]
        if not expand:
            break
        table = attributor.children([occs[i].probe for i in expand])  # type: ignore[misc]
        vals = table.values  # [P, total]
        score = vals.abs()
        if cfg.min_abs > 0:
            score = torch.where(score >= cfg.min_abs, score, torch.zeros_like(score))
        if cfg.per_node:
            k = min(cfg.per_node, score.shape[1])
            thr = score.topk(k, dim=1).values[:, -1:]
            score = torch.where(score >= thr, score, torch.zeros_like(score))
        flat = score.reshape(-1)
        k = min(cfg.beam, int((flat > 0).sum()))
        chosen = flat.topk(k).indices.tolist() if k > 0 else []
        total = vals.shape[1]
        kept_mask = torch.zeros_like(vals, dtype=torch.bool)
        new_frontier = []
        for flat_idx in chosen:
            row, col = divmod(int(flat_idx), total)
            kept_mask[row, col] = True
            parent = occs[expand[row]]
            node = table.node(row, col)
            attribution = float(vals[row, col])
            child = Occurrence(len(occs), node, parent.id, attribution, depth,
                               attributor.child_probe(parent.probe, node),  # type: ignore[arg-type]
                               info=attributor.node_info(node, parent.probe))
            occs.append(child)
            parent.children.append(child.id)
            new_frontier.append(child.id)
        err = table.error_mask.to(vals.device)
        for row, i in enumerate(expand):
            v, kept = vals[row], kept_mask[row]
            o = occs[i]
            o.expanded = True
            kept_sum = float(v[kept].sum())
            tc_err = float(v[err & ~kept].sum())
            o.breakdown = {"kept": kept_sum, "tc_error": tc_err, "bias": float(table.bias[row]),
                           "pruned": float(v[~err & ~kept].sum())}
            o.children.sort(key=lambda c: -abs(occs[c].attribution))
            if o.parent is None:
                denom = float(v.abs().sum()) + abs(float(table.bias[row]))
                o.info["root_error_share"] = float(v[err].abs().sum()) / denom if denom > 0 else 0.0
        frontier = new_frontier
    paths = []
    for o in occs[1:]:
        if not o.children:
            chain = []
            j: int | None = o.id
            while j is not None:
                chain.append(occs[j].name)
                j = occs[j].parent
            paths.append(PathResult(chain[::-1], o.attribution))
    paths.sort(key=lambda p: -abs(p.attribution))
    return SearchResult(root, value, occs, paths, cfg)
