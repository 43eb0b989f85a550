"""The automatic check of an attribution graph against interventions, frozen and live.

For the ``n`` feature nodes with the largest influence, the graph predicts the change of the target
logit (the first logit node: the top prediction, a chosen token, or a difference) when the feature
is ablated at its position: ``-activation x total effect``, the total effect summing every path
through the graph's feature nodes (:func:`~mechfaith.circuits.graph_scores.total_effects`). The
check measures the same ablation

- in the **frozen** world (:func:`~mechfaith.circuits.interventions.run_frozen`: attention
  patterns and norm scales frozen, features recomputed by their coders): the graph's own world,
  where prediction and measurement differ only by features switching on or off and by paths through
  features left out of the graph;
- in the **live** world (:func:`~mechfaith.circuits.interventions.run_live`): the real model with
  transcoders spliced in (errors added back), attention and norms responding,

and reports the Spearman rank correlation and the median relative error ``|predicted - measured| /
|measured|`` in each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mechfaith.circuits.attribution_graph import AttributionGraph
from mechfaith.circuits.graph_scores import total_effects
from mechfaith.circuits.interventions import Intervention, demeaned_logit, run_frozen, run_live
from mechfaith.circuits.replacement import ReplacementRun
from mechfaith.toy.experiments import spearman


@dataclass
class FeatureCheck:
    """One feature: the graph's predicted logit change on ablation and the measured ones."""

    node: str
    layer: int
    pos: int
    index: int
    activation: float
    influence: float
    predicted: float
    frozen: float
    live: float


@dataclass
class InterventionCheck:
    """Prediction against measurement for the most influential features (see the module docstring)."""

    target: str
    features: list[FeatureCheck]
    spearman_frozen: float
    spearman_live: float
    median_rel_error_frozen: float
    median_rel_error_live: float

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "spearman_frozen": self.spearman_frozen,
                "spearman_live": self.spearman_live, "median_rel_error_frozen": self.median_rel_error_frozen,
                "median_rel_error_live": self.median_rel_error_live,
                "features": [vars(f) for f in self.features]}


def _median_rel_error(pred: list[float], meas: list[float]) -> float:
    if not pred:
        return float("nan")
    p, m = torch.tensor(pred, dtype=torch.float64), torch.tensor(meas, dtype=torch.float64)
    return float(((p - m).abs() / m.abs().clamp_min(1e-12)).median())


def check_graph(model: Any, run: ReplacementRun, graph: AttributionGraph, n: int = 20,
                progress: Callable[[int, int], None] | None = None) -> InterventionCheck:
    """Ablate the ``n`` most influential feature nodes one at a time, frozen and live (see above)."""
    F = graph.blocks.n_features
    lg = graph.logits
    tok, minus = lg.tokens[0], lg.minus
    te = total_effects(graph.edges, graph.activations, graph.blocks, 0)
    infl = graph.influence()[:F]
    top = torch.argsort(infl, descending=True)[:min(n, F)]
    base_frozen = demeaned_logit(run_frozen(run).logits, lg.pos, tok, minus)
    base_live = demeaned_logit(run_live(model, run).logits, lg.pos, tok, minus)
    rows = []
    for k, j in enumerate(top.tolist()):
        l, p, i = (int(v) for v in graph.features[j])
        iv = [Intervention(l, i, p)]
        a = float(graph.activations[j])
        rows.append(FeatureCheck(
            graph.node_name(j), l, p, i, a, float(infl[j]), -a * float(te[j]),
            demeaned_logit(run_frozen(run, iv).logits, lg.pos, tok, minus) - base_frozen,
            demeaned_logit(run_live(model, run, iv).logits, lg.pos, tok, minus) - base_live))
        if progress is not None:
            progress(k + 1, len(top))
    pred = [r.predicted for r in rows]
    fro = [r.frozen for r in rows]
    liv = [r.live for r in rows]
    return InterventionCheck(lg.label(0), rows, spearman(pred, fro) if len(rows) > 1 else float("nan"),
                             spearman(pred, liv) if len(rows) > 1 else float("nan"),
                             _median_rel_error(pred, fro), _median_rel_error(pred, liv))
