"""An attribution graph as JSON: mechfaith's own format and the one circuit-tracer's frontend and
Neuronpedia load.

Both take an :class:`~mechfaith.circuits.attribution_graph.AttributionGraph` and what its pruning
kept (:class:`~mechfaith.circuits.graph_scores.Pruned`) and list the kept nodes (in node order:
features, errors, tokens, logits) and the kept edges (row-major over ``edges [F + K, F + E + T]``:
targets in node order, then sources in node order).

**Own format** (:func:`graph_to_json`, written with ``mechfaith.jsonio.write_json``; :func:`read_graph_json`):
``{"format": "mechfaith.attribution_graph", "format_version": 1, ...}`` with both scores, the
prompt, the logit targets, the :class:`~mechfaith.circuits.attribution_graph.GraphConfig`, counts,
``nodes`` (``id``: the node's name from :meth:`AttributionGraph.node_name`, ``kind``, ``layer``:
-1 for tokens and ``n_layers`` for logits, ``pos``, ``influence``: the raw influence on the
weighted logits, ``token``: the token string at ``pos`` where known; features add ``feature`` and
``activation``, logits ``token_id``, ``probability``, ``weight``), ``links`` (``source``,
``target``: node ids, ``weight``: the direct effect) and the caller's ``meta``.

**Neuronpedia format** (:func:`neuronpedia_json`): the pydantic ``Model`` of circuit-tracer's
``circuit_tracer/frontend/graph_models.py`` as ``circuit_tracer/utils/create_graph_files.py``
fills it (read with ``search``; no code copied). Top level: ``metadata``, ``qParams``, ``nodes``,
``links``.

- ``metadata`` (``Metadata``, filled as ``build_model`` does): ``slug``, ``scan`` and
  ``transcoder_list`` from ``meta`` (defaults ``"mechfaith-graph"``, ``"mechfaith"``, ``[]``),
  ``prompt_tokens`` (the prompt's token strings, whitespace left for the frontend's own
  replacement, as the current ``build_model`` does), ``prompt`` (``meta["prompt"]`` or the joined
  token strings), ``node_threshold`` (the graph's), ``schema_version`` 1.
- ``qParams`` (``QParams``, as ``build_model``): ``pinnedIds []``, ``supernodes []``,
  ``linkType "both"``, ``clickedId ""``, ``sg_pos ""``.
- every node carries all fields of ``Node`` (``node_id``, ``feature``, ``layer`` (a string),
  ``ctx_idx``, ``feature_type``, ``token_prob``, ``is_target_logit``, ``run_idx`` 0,
  ``reverse_ctx_idx`` 0, ``jsNodeId``, ``clerp``, ``influence``, ``activation``), as
  ``create_nodes`` makes them with the ``Node`` class methods:

  =========  ==========================  ===========================  ========================  =====
  kind       node_id                     feature                      jsNodeId                  layer
  =========  ==========================  ===========================  ========================  =====
  feature    ``{layer}_{index}_{pos}``   Cantor pairing of (layer,    ``{layer}_{index}-0``     layer
             (``Node.feature_node``)     index): ``(l+i)(l+i+1)/2+i``
  error      ``{layer}_-1_{pos}``        -1                           ``{layer}_-1-{pos}``      layer
             (``Node.error_node``)
  token      ``E_{token id}_{pos}``      pos                          ``E_{token id}-{pos}``    ``E``
             (``Node.token_node``)
  logit      ``{L+1}_{token id}_{pos}``  token id                     ``L_{token id}-{pos}``    L + 1
             (``Node.logit_node``)
  =========  ==========================  ===========================  ========================  =====

  with ``L`` the number of layers; ``feature_type`` is ``"cross layer transcoder"``, ``"mlp
  reconstruction error"``, ``"embedding"`` or ``"logit"``. Error ids follow the current
  ``error_node`` (circuit-tracer pull requests #100/#102); releases before it wrote
  ``0_{layer}_{pos}``, which collides with feature ``layer`` of layer 0 at the same position.
  Features, errors and tokens carry ``influence``: the *cumulative* influence of ``prune_graph``
  (nodes sorted by influence, descending; a node's value is the share of the total influence held
  by it and every node before it), features ``activation``; the others ``None`` as in
  ``create_nodes``. Logit nodes: ``token_prob`` (the probability), ``is_target_logit`` for the first
  (the most probable), ``clerp`` ``Output "{token}" (p={prob:.3f})`` (for a logit difference the
  token text is ``"{token} - {minus}"``), and ``ctx_idx`` the target position (circuit-tracer's is
  always the last one).
- ``links``: ``{"source", "target", "weight"}`` (``Link``), in ``create_used_nodes_and_edges``'s
  order; as there, only nodes with a kept link, tokens and logits are listed.

Token strings of logit tokens come from ``logit_strings`` when given, else from the prompt when
the token occurs in it, else ``#{token id}``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.circuits.attribution_graph import AttributionGraph
from mechfaith.circuits.graph import read_versioned_json
from mechfaith.circuits.graph_scores import Pruned
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.jsonio import json_safe

FORMAT = "mechfaith.attribution_graph"
FORMAT_VERSION = 1
NEURONPEDIA_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                     "token": "embedding", "logit": "logit"}


def cantor_pairing(x: int, y: int) -> int:
    """The Cantor pairing of two natural numbers (circuit-tracer's feature number of a node)."""
    return (x + y) * (x + y + 1) // 2 + y


def cumulative_influence(influence: Tensor) -> Tensor:
    """Per node, the share of the total influence held by the nodes at least as influential, in a
    stable descending order (``prune_graph``'s ``cumulative_scores``)."""
    order = torch.sort(influence, descending=True, stable=True).indices
    total = influence.sum()
    cum = influence[order].cumsum(0) / (total if float(total) > 0 else torch.ones_like(total))
    out = torch.zeros_like(influence)
    out[order] = cum
    return out


def check_pruned(graph: AttributionGraph, pruned: Pruned) -> None:
    b = graph.blocks
    if tuple(pruned.node_mask.shape) != (b.n_nodes,) or tuple(pruned.edge_mask.shape) != (b.n_targets, b.n_sources):
        raise ConfigError(f"pruning masks of shapes {tuple(pruned.node_mask.shape)}, {tuple(pruned.edge_mask.shape)} "
                          f"do not fit a graph of {b.n_nodes} nodes and edges ({b.n_targets}, {b.n_sources})")


def kept_links(graph: AttributionGraph, pruned: Pruned) -> list[tuple[int, int, float]]:
    """``(source node, target node, weight)`` of every kept edge between kept nodes, row-major."""
    check_pruned(graph, pruned)
    rows = graph.blocks.row_nodes()
    keep = pruned.node_mask.bool()
    mask = pruned.edge_mask.bool() & keep[rows][:, None] & keep[:graph.blocks.n_sources][None, :]
    r, c = mask.nonzero(as_tuple=True)
    weights = graph.edges[r, c].tolist()
    return [(int(s), int(rows[t]), float(w)) for s, t, w in zip(c.tolist(), r.tolist(), weights)]


def logit_token_string(graph: AttributionGraph, token: int, logit_strings: Sequence[str] | None = None,
                       k: int = -1) -> str | None:
    """The text of a logit token: ``logit_strings[k]``, else its text in the prompt, else None."""
    if logit_strings is not None and 0 <= k < len(logit_strings):
        return logit_strings[k]
    if graph.token_strings is not None and token in graph.tokens:
        return graph.token_strings[graph.tokens.index(token)]
    return None


def node_position(graph: AttributionGraph, i: int) -> tuple[str, int, int]:
    """``(kind, layer, pos)`` of node ``i`` (layer -1 for tokens, ``n_layers`` for logits)."""
    b = graph.blocks
    kind = graph.node_kind(i)
    if kind == "feature":
        return kind, int(graph.features[i, 0]), int(graph.features[i, 1])
    if kind == "error":
        layer, pos = divmod(i - b.n_features, graph.seq_len)
        return kind, layer, pos
    if kind == "token":
        return kind, -1, i - b.n_features - b.n_errors
    return kind, graph.n_layers, graph.logits.pos


def own_node(graph: AttributionGraph, i: int, influence: float,
             logit_strings: Sequence[str] | None = None) -> dict[str, Any]:
    """One node of the own format."""
    kind, layer, pos = node_position(graph, i)
    node: dict[str, Any] = {"id": graph.node_name(i), "index": i, "kind": kind, "layer": layer, "pos": pos,
                            "influence": influence}
    if graph.token_strings is not None and kind != "logit":
        node["token"] = graph.token_strings[pos]
    if kind == "feature":
        node["feature"] = int(graph.features[i, 2])
        node["activation"] = float(graph.activations[i])
    elif kind == "token":
        node["token_id"] = graph.tokens[pos]
    elif kind == "logit":
        k = i - graph.blocks.n_sources
        lg = graph.logits
        node.update(token_id=lg.tokens[k], probability=float(lg.probabilities[k]), weight=float(lg.weights[k]))
        text = logit_token_string(graph, lg.tokens[k], logit_strings, k)
        if text is not None:
            node["token"] = text
        if lg.minus >= 0:
            node["minus_token_id"] = lg.minus
    return node


def graph_counts(graph: AttributionGraph, pruned: Pruned, n_links: int) -> dict[str, int]:
    b = graph.blocks
    keep = pruned.node_mask.bool()
    F, E = b.n_features, b.n_errors
    return {"active_features": graph.n_active, "feature_nodes": F, "error_nodes": E, "token_nodes": b.n_tokens,
            "logit_nodes": b.n_logits, "nodes": b.n_nodes, "edges": int((graph.edges != 0).sum()),
            "kept_nodes": int(keep.sum()), "kept_features": int(keep[:F].sum()),
            "kept_errors": int(keep[F:F + E].sum()), "kept_edges": n_links}


def graph_to_json(graph: AttributionGraph, pruned: Pruned, meta: dict[str, Any] | None = None, *,
                  logit_strings: Sequence[str] | None = None) -> dict[str, Any]:
    """The kept part of a graph in mechfaith's own format (see the module docstring)."""
    links = kept_links(graph, pruned)
    infl = pruned.influence.tolist()
    scores = graph.scores()
    lg = graph.logits
    nodes = [own_node(graph, i, float(infl[i]), logit_strings) for i in pruned.node_mask.nonzero().flatten().tolist()]
    out = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "replacement_score": scores.replacement_score, "completeness_score": scores.completeness_score,
        "n_layers": graph.n_layers, "tokens": list(graph.tokens), "token_strings": graph.token_strings,
        "target": {"pos": lg.pos, "tokens": list(lg.tokens), "probabilities": lg.probabilities.tolist(),
                   "weights": lg.weights.tolist(), "minus": lg.minus},
        "config": dataclasses.asdict(graph.config), "counts": graph_counts(graph, pruned, len(links)),
        "seconds": graph.seconds, "nodes": nodes,
        "links": [{"source": graph.node_name(s), "target": graph.node_name(t), "weight": w} for s, t, w in links],
        "meta": meta or {}}
    return json_safe(out)


def read_graph_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check an attribution graph in the own format."""
    data = read_versioned_json(path, FORMAT, FORMAT_VERSION, "attribution graph")
    if not isinstance(data.get("nodes"), list) or not isinstance(data.get("links"), list):
        raise CoderFileError(path, "an attribution graph needs lists 'nodes' and 'links'")
    return data


def neuronpedia_node(graph: AttributionGraph, i: int, influence: float,
                     logit_strings: Sequence[str] | None = None) -> dict[str, Any]:
    """One node as circuit-tracer's ``Node`` class methods make it (table in the module docstring)."""
    kind, layer, pos = node_position(graph, i)
    node: dict[str, Any] = {"feature_type": NEURONPEDIA_TYPES[kind], "ctx_idx": pos, "token_prob": 0.0,
                            "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
                            "influence": influence, "activation": None}
    if kind == "feature":
        index = int(graph.features[i, 2])
        node.update(node_id=f"{layer}_{index}_{pos}", feature=cantor_pairing(layer, index), layer=str(layer),
                    jsNodeId=f"{layer}_{index}-0", activation=float(graph.activations[i]))
    elif kind == "error":
        node.update(node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), jsNodeId=f"{layer}_-1-{pos}")
    elif kind == "token":
        tok = graph.tokens[pos]
        node.update(node_id=f"E_{tok}_{pos}", feature=pos, layer="E", jsNodeId=f"E_{tok}-{pos}")
    else:
        k = i - graph.blocks.n_sources
        lg = graph.logits
        tok, prob = lg.tokens[k], float(lg.probabilities[k])
        text = logit_token_string(graph, tok, logit_strings, k) or f"#{tok}"
        if lg.minus >= 0:
            text = f"{text} - {logit_token_string(graph, lg.minus) or f'#{lg.minus}'}"
        top = str(graph.n_layers + 1)
        node.update(node_id=f"{top}_{tok}_{pos}", feature=tok, layer=top, jsNodeId=f"L_{tok}-{pos}",
                    token_prob=prob, is_target_logit=k == 0, clerp=f'Output "{text}" (p={prob:.3f})',
                    influence=None)
    return node


def neuronpedia_json(graph: AttributionGraph, pruned: Pruned, meta: dict[str, Any] | None = None, *,
                     logit_strings: Sequence[str] | None = None) -> dict[str, Any]:
    """The kept part of a graph as circuit-tracer's frontend and Neuronpedia load it (see the module
    docstring); ``meta`` gives ``slug``, ``scan``, ``transcoder_list`` and ``prompt``."""
    meta = meta or {}
    cum = cumulative_influence(pruned.influence).tolist()
    kept = pruned.node_mask.nonzero().flatten().tolist()
    nodes = {i: neuronpedia_node(graph, i, float(cum[i]), logit_strings) for i in kept}
    links = [(s, t, w) for s, t, w in kept_links(graph, pruned) if s in nodes and t in nodes]
    linked = {s for s, _, _ in links} | {t for _, t, _ in links}
    used = [n for i, n in nodes.items() if i in linked or n["feature_type"] in ("embedding", "logit")]
    strings = graph.token_strings if graph.token_strings is not None else [str(t) for t in graph.tokens]
    metadata = {"slug": str(meta.get("slug", "mechfaith-graph")), "scan": str(meta.get("scan", "mechfaith")),
                "transcoder_list": [str(t) for t in meta.get("transcoder_list", [])],
                "prompt_tokens": list(strings), "prompt": str(meta.get("prompt", "".join(strings))),
                "node_threshold": float(graph.config.node_threshold), "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    out = {"metadata": metadata, "qParams": qparams, "nodes": used,
           "links": [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
                     for s, t, w in links]}
    return json_safe(out)
