"""Merge searched paths into a computational graph and export it as JSON.

Nodes are merged by name; a node's attribution is the sum of its occurrences' attributions (each
distinct path prefix counted once); an edge ``child -> parent`` carries the sum over occurrences of
the child's attribution under that parent (``weight``, root units). For an edge into a feature,
``direct`` is the same edge in the parent's own units: the change of the parent's pre-activation
when the child's contribution is removed.

Every node expanded by the search gets error nodes (``N:tc_err``, ``N:bias``, ``N:pruned``) so
that its children's edge weights plus its error nodes sum to its attribution exactly; occurrences
of such a node that were not expanded add their attribution to ``N:pruned``. Nodes never expanded
are marked ``expanded: false``.

``error_share`` statistics: ``root_error_share`` is the share of the root's absolute direct
contributions that comes from transcoder errors; ``graph_error_share`` the share of the absolute
attribution of all expanded nodes' children (kept, errors, bias, pruned) that is transcoder error
(error leaves in the graph plus ``tc_err`` nodes); ``bias_share`` and ``pruned_share`` likewise.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from mechfaith.circuits.search import SearchResult
from mechfaith.coders.files import read_json
from mechfaith.errors import CoderFileError
from mechfaith.jsonio import write_json

FORMAT = "mechfaith.circuit_graph"
FORMAT_VERSION = 1
ERROR_KINDS = ("tc_err", "bias", "pruned")


def build_graph(result: SearchResult, *, n_layers: int, tokens: list[int] | None = None,
                token_strings: list[str] | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged graph of a search as a JSON-safe dict."""
    occs = result.occurrences
    nodes: dict[str, dict[str, Any]] = {}
    edges: dict[tuple[str, str], float] = defaultdict(float)
    breakdown: dict[str, dict[str, float]] = {}
    unexpanded: dict[str, float] = defaultdict(float)
    defaultdict(float)
    for o in occs:
        nd = nodes.get(o.name)
        if nd is None:
            n = o.node
            nd = nodes[o.name] = {
                "name": o.name, "kind": n.kind, "layer": n.layer, "pos": n.pos, "index": n.index,
                "coord": n.coordinate(n_layers), "attribution": 0.0, "occurrences": 0,
                "expanded": False, "is_root": o.parent is None, **{k: v for k, v in o.info.items()
                                                                  if k not in ("dest", "pattern")}}
        nd["attribution"] += o.attribution
        nd["occurrences"] += 1
        if o.parent is not None:
            edges[(o.name, occs[o.parent].name)] += o.attribution
        if o.expanded and o.breakdown is not None:
            nd["expanded"] = True
            b = breakdown.setdefault(o.name, {k: 0.0 for k in ERROR_KINDS})
            for k_src, k_dst in (("tc_error", "tc_err"), ("bias", "bias"), ("pruned", "pruned")):
                b[k_dst] += o.breakdown[k_src]
        elif not o.node.is_leaf:
            unexpanded[o.name] += o.attribution
    for name, amount in unexpanded.items():
        if name in breakdown:
            breakdown[name]["pruned"] += amount
    node_list = list(nodes.values())
    edge_list = []
    for (child, parent), w in edges.items():
        e: dict[str, Any] = {"source": child, "target": parent, "weight": w}
        pn = nodes[parent]
        if pn["kind"] == "feature" and "activation" in pn and abs(pn["attribution"]) > 0:
            e["direct"] = w * pn["activation"] / pn["attribution"] if not pn["is_root"] else w
        edge_list.append(e)
    for name, b in breakdown.items():
        pnode = nodes[name]
        for kind in ERROR_KINDS:
            ename = f"{name}:{kind}"
            node_list.append({"name": ename, "kind": f"err_{kind}", "layer": pnode["layer"],
                              "pos": pnode["pos"], "index": -1, "coord": pnode["coord"],
                              "attribution": b[kind], "occurrences": 1, "expanded": False,
                              "is_root": False, "error_of": name})
            edge_list.append({"source": ename, "target": name, "weight": b[kind]})
    stats = graph_stats(result, node_list)
    out: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "root": result.root.name,
        "root_value": result.root_value, "n_layers": n_layers,
        "search": {"depth": result.config.depth, "beam": result.config.beam,
                   "per_node": result.config.per_node, "min_abs": result.config.min_abs},
        "tokens": tokens, "token_strings": token_strings, "nodes": node_list, "edges": edge_list,
        "paths": [{"nodes": p.nodes, "attribution": p.attribution} for p in result.paths],
        "stats": stats, "meta": meta or {}}
    return out


def graph_stats(result: SearchResult, node_list: list[dict[str, Any]]) -> dict[str, float]:
    occs = result.occurrences
    root = occs[0]
    tot = {"tc_error": 0.0, "bias": 0.0, "pruned": 0.0, "kept": 0.0}
    for o in occs:
        if not o.expanded or o.breakdown is None:
            continue
        kept_err = sum(abs(occs[c].attribution) for c in o.children if occs[c].node.kind == "error")
        kept_other = sum(abs(occs[c].attribution) for c in o.children if occs[c].node.kind != "error")
        tot["tc_error"] += abs(o.breakdown["tc_error"]) + kept_err
        tot["kept"] += kept_other
        tot["bias"] += abs(o.breakdown["bias"])
        tot["pruned"] += abs(o.breakdown["pruned"])
    denom = sum(tot.values()) or 1.0
    stats = {"graph_error_share": tot["tc_error"] / denom, "bias_share": tot["bias"] / denom,
             "pruned_share": tot["pruned"] / denom, "kept_share": tot["kept"] / denom,
             "n_nodes": float(sum(1 for n in node_list if not n["kind"].startswith("err_"))),
             "n_paths": float(len(result.paths))}
    rb = root.info.get("root_error_share")
    if rb is not None:
        stats["root_error_share"] = rb
    return stats


def write_graph(path: str | os.PathLike[str], graph: dict[str, Any]) -> None:
    """Write a graph JSON atomically."""
    write_json(path, graph)


def read_graph(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a graph JSON."""
    return read_versioned_json(path, FORMAT, FORMAT_VERSION, "graph")


def read_versioned_json(path: str | os.PathLike[str], fmt: str, version: int, what: str) -> dict[str, Any]:
    """A JSON object whose ``format`` is ``fmt`` and ``format_version`` is ``version`` (else a
    CoderFileError naming the file)."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise CoderFileError(path, f"not a {fmt} file")
    if data.get("format_version") != version:
        raise CoderFileError(path, f"{what} format version {data.get('format_version')} is not supported")
    return data


def check_completeness(graph: dict[str, Any], rtol: float = 1e-4) -> list[str]:
    """Names of expanded nodes whose incoming edges do not sum to their attribution."""
    incoming: dict[str, float] = defaultdict(float)
    for e in graph["edges"]:
        incoming[e["target"]] += e["weight"]
    scale = max((abs(n["attribution"]) for n in graph["nodes"]), default=1.0) or 1.0
    bad = []
    for n in graph["nodes"]:
        if n["expanded"] and abs(incoming[n["name"]] - n["attribution"]) > rtol * scale:
            bad.append(n["name"])
    return bad
