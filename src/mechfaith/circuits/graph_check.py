"""The automatic check of an attribution graph against interventions, in three worlds.

For the ``n`` feature nodes with the largest influence, the graph predicts the change of the target
logit (the first logit node: the top prediction, a chosen token, or a difference) when the feature
is ablated at its position: ``-activation x total effect``, the total effect summing every path
through the graph's feature nodes (:func:`~mechfaith.circuits.graph_scores.total_effects`). The
check measures the same ablation in

- **frozen**: the graph's own world (:func:`~mechfaith.circuits.interventions.run_frozen` with
  ``features="linear"``): attention patterns, norm scales *and* each transcoder's set of active
  features frozen, as the linearisation freezes them; prediction and measurement differ only by
  paths through active features left out of the graph (the feature budget);
- **frozen_nonlinear**: attention and norms frozen, features recomputed by their coders' activation
  (TopK re-selects its k, JumpReLU re-gates): what the frozen linearisation leaves out. With TopK
  coders this is dominated by swaps at the k-th place: the k-th and (k+1)-th pre-activations are
  close, so a small change downstream swaps features of activation near the cut-off in and out;
- **live_linear**: the real model with the transcoders spliced in (errors added back), attention and
  norms responding, each transcoder's active set frozen
  (:func:`~mechfaith.circuits.interventions.run_live` with ``features="linear"``): what freezing
  attention and norms leaves out;
- **live**: the same with activations recomputed too: everything responds,

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
    frozen_nonlinear: float
    live_linear: float
    live: float


@dataclass
class InterventionCheck:
    """Prediction against measurement for the most influential features (see the module docstring)."""

    target: str
    features: list[FeatureCheck]
    spearman: dict[str, float]  # world -> rank correlation of predicted and measured
    median_rel_error: dict[str, float]  # world -> median |predicted - measured| / |measured|

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "spearman": self.spearman, "median_rel_error": self.median_rel_error,
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
    worlds: dict[str, Callable[[list[Intervention]], float]] = {
        "frozen": lambda iv: demeaned_logit(run_frozen(run, iv, features="linear").logits, lg.pos, tok, minus),
        "frozen_nonlinear": lambda iv: demeaned_logit(run_frozen(run, iv).logits, lg.pos, tok, minus),
        "live_linear": lambda iv: demeaned_logit(run_live(model, run, iv, features="linear").logits, lg.pos, tok,
                                                 minus),
        "live": lambda iv: demeaned_logit(run_live(model, run, iv).logits, lg.pos, tok, minus)}
    base = {w: fn([]) for w, fn in worlds.items()}
    rows = []
    for k, j in enumerate(top.tolist()):
        l, p, i = (int(v) for v in graph.features[j])
        iv = [Intervention(l, i, p)]
        a = float(graph.activations[j])
        measured = {w: fn(iv) - base[w] for w, fn in worlds.items()}
        rows.append(FeatureCheck(graph.node_name(j), l, p, i, a, float(infl[j]), -a * float(te[j]), **measured))
        if progress is not None:
            progress(k + 1, len(top))
    pred = [r.predicted for r in rows]
    meas = {w: [getattr(r, w) for r in rows] for w in worlds}
    return InterventionCheck(
        lg.label(0), rows, {w: spearman(pred, m) if len(rows) > 1 else float("nan") for w, m in meas.items()},
        {w: _median_rel_error(pred, m) for w, m in meas.items()})
