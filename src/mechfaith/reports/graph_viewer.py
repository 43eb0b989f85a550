"""A self-contained HTML viewer of a circuit graph (inline SVG + JavaScript, no external files).

Token position runs along the x axis, depth in the model (embeddings at the bottom, then attention
and MLP of each layer, logits on top) along the y axis. Node size follows |attribution|, edge width
follows |weight|; blue is positive, red negative. Hovering a node or an edge shows its details
(name, kind, attribution, activation, token; error nodes are listed under their node). The graph
JSON is embedded in the page, so the file opens anywhere, offline.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mechfaith.atomic import write_text_atomic
from mechfaith.reports.page import esc, html_page

_CSS = """
body { margin: 16px; max-width: none; }
h1 { font-size: 20px; margin: 0 0 6px 0; }
#summary { font-size: 13px; color: #444; margin-bottom: 8px; }
#wrap { display: flex; gap: 16px; align-items: flex-start; }
#details { font-size: 13px; min-width: 260px; max-width: 340px; border: 1px solid #ccc; padding: 8px;
           border-radius: 4px; background: #fafafa; white-space: pre-wrap; }
svg text { font-size: 10px; fill: #333; }
.node { cursor: pointer; stroke: #222; stroke-width: 0.7; }
.node.err { stroke-dasharray: 2 1; }
.edge { fill: none; }
.edge:hover, .node:hover { opacity: 0.6; }
table.paths { font-size: 12px; border-collapse: collapse; margin-top: 12px; }
table.paths td { padding: 2px 8px; border: none; border-bottom: 1px solid #eee; font-family: monospace; }
"""

_JS = r"""
(function () {
  const g = JSON.parse(document.getElementById('graph-data').textContent);
  const svgNS = 'http://www.w3.org/2000/svg';
  const svg = document.getElementById('graph');
  const details = document.getElementById('details');
  const nL = g.n_layers;
  const showErr = document.getElementById('show-errors');
  const nodesAll = g.nodes;
  function draw() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const withErr = showErr.checked;
    const nodes = nodesAll.filter(n => withErr || !n.kind.startsWith('err_'));
    const positions = Array.from(new Set(nodes.map(n => n.pos))).sort((a, b) => a - b);
    const colW = 120, rowH = 34, left = 90, top = 20;
    const nRows = 2 * nL + 2;
    const width = left + Math.max(1, positions.length) * colW + 40;
    const height = top + nRows * rowH + 50;
    svg.setAttribute('width', width); svg.setAttribute('height', height);
    const xOf = {}; positions.forEach((p, i) => { xOf[p] = left + i * colW + colW / 2; });
    const groups = {};
    nodes.forEach(n => { const k = n.pos + ':' + n.coord; (groups[k] = groups[k] || []).push(n); });
    const at = {};
    Object.values(groups).forEach(list => {
      list.sort((a, b) => Math.abs(b.attribution) - Math.abs(a.attribution));
      list.forEach((n, i) => {
        const off = (i - (list.length - 1) / 2) * Math.min(22, (colW - 20) / Math.max(1, list.length));
        at[n.name] = [xOf[n.pos] + off, top + (nRows - 1 - n.coord) * rowH + rowH / 2];
      });
    });
    // grid rows
    for (let c = 0; c < nRows; c++) {
      const y = top + (nRows - 1 - c) * rowH + rowH / 2;
      const t = document.createElementNS(svgNS, 'text');
      t.setAttribute('x', 4); t.setAttribute('y', y + 3);
      t.textContent = c === 0 ? 'embed' : (c === nRows - 1 ? 'logits' :
        ((c % 2 === 1 ? 'attn ' : 'mlp ') + Math.floor((c - 1) / 2)));
      svg.appendChild(t);
      const ln = document.createElementNS(svgNS, 'line');
      ln.setAttribute('x1', left); ln.setAttribute('x2', width - 20);
      ln.setAttribute('y1', y); ln.setAttribute('y2', y);
      ln.setAttribute('stroke', '#eee'); svg.appendChild(ln);
    }
    positions.forEach(p => {
      const t = document.createElementNS(svgNS, 'text');
      t.setAttribute('x', xOf[p] - 30); t.setAttribute('y', height - 24);
      const tok = g.token_strings ? g.token_strings[p] : (g.tokens ? String(g.tokens[p]) : '');
      t.textContent = p + ': ' + JSON.stringify(tok === undefined ? '' : tok).slice(0, 16);
      t.setAttribute('class', 'tok');
      svg.appendChild(t);
    });
    const maxW = Math.max(1e-12, ...g.edges.map(e => Math.abs(e.weight)));
    const maxA = Math.max(1e-12, ...nodes.map(n => Math.abs(n.attribution)));
    g.edges.forEach(e => {
      if (!(e.source in at) || !(e.target in at)) return;
      const [x1, y1] = at[e.source], [x2, y2] = at[e.target];
      const p = document.createElementNS(svgNS, 'path');
      const my = (y1 + y2) / 2;
      p.setAttribute('d', `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`);
      p.setAttribute('class', 'edge');
      p.setAttribute('stroke', e.weight >= 0 ? '#2b6cb0' : '#c53030');
      p.setAttribute('stroke-opacity', '0.55');
      p.setAttribute('stroke-width', (0.5 + 7 * Math.abs(e.weight) / maxW).toFixed(2));
      const title = document.createElementNS(svgNS, 'title');
      title.textContent = `${e.source} -> ${e.target}: ${e.weight.toPrecision(4)}` +
        (e.direct !== undefined ? ` (direct ${e.direct.toPrecision(4)})` : '');
      p.appendChild(title);
      p.addEventListener('mouseenter', () => { details.textContent = title.textContent; });
      svg.appendChild(p);
    });
    const colors = {feature: '#f6ad55', attn: '#68d391', skip: '#b794f4', error: '#a0aec0',
      mlp: '#ecc94b', emb: '#63b3ed', pos: '#90cdf4', logit: '#fc8181',
      err_tc_err: '#cbd5e0', err_bias: '#e2e8f0', err_pruned: '#edf2f7'};
    nodes.forEach(n => {
      const [x, y] = at[n.name];
      const c = document.createElementNS(svgNS, 'circle');
      c.setAttribute('cx', x); c.setAttribute('cy', y);
      c.setAttribute('r', (3 + 9 * Math.sqrt(Math.abs(n.attribution) / maxA)).toFixed(2));
      c.setAttribute('fill', colors[n.kind] || '#ccc');
      c.setAttribute('class', 'node' + (n.kind.startsWith('err_') ? ' err' : ''));
      c.setAttribute('data-name', n.name);
      const lines = [n.name, 'kind: ' + n.kind, 'attribution: ' + n.attribution.toPrecision(5)];
      if (n.activation !== undefined) lines.push('activation: ' + n.activation.toPrecision(5));
      if (n.token !== undefined) lines.push('token: ' + JSON.stringify(n.token));
      else if (n.token_id !== undefined) lines.push('token id: ' + n.token_id);
      if (n.occurrences > 1) lines.push('paths through it: ' + n.occurrences);
      if (n.is_root) lines.push('(root)');
      if (n.error_of) lines.push('error node of ' + n.error_of);
      if (n.root_error_share !== undefined) lines.push('root error share: ' + n.root_error_share.toFixed(3));
      const title = document.createElementNS(svgNS, 'title');
      title.textContent = lines.join('\n');
      c.appendChild(title);
      c.addEventListener('mouseenter', () => { details.textContent = title.textContent; });
      svg.appendChild(c);
    });
  }
  showErr.addEventListener('change', draw);
  draw();
})();
"""


def _script_json(data: Any) -> str:
    return json.dumps(data).replace("</", "<\\/")


def graph_html(graph: dict[str, Any], title: str | None = None) -> str:
    """The viewer page for a graph dict (as written by :func:`mechfaith.circuits.graph.build_graph`)."""
    title = title or f"Circuit of {graph.get('root', '?')}"
    stats = graph.get("stats", {})
    summary = (f"root {graph.get('root')} = {graph.get('root_value', float('nan')):.4g}; "
               f"{int(stats.get('n_nodes', 0))} nodes, {len(graph.get('edges', []))} edges, "
               f"{int(stats.get('n_paths', 0))} paths; error share {stats.get('graph_error_share', float('nan')):.3f} "
               f"(root {stats.get('root_error_share', float('nan')):.3f}), bias {stats.get('bias_share', float('nan')):.3f}, "
               f"pruned {stats.get('pruned_share', float('nan')):.3f}")
    rows = "".join(f"<tr><td>{p['attribution']:.4g}</td><td>{esc(' <- '.join(p['nodes']))}</td></tr>"
                   for p in graph.get("paths", [])[:50])
    return html_page(title, f"""<h1>{esc(title)}</h1>
<div id="summary">{esc(summary)}</div>
<label><input type="checkbox" id="show-errors" checked> show error nodes</label>
<div id="wrap"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg>
<div id="details">Hover a node or an edge for details.</div></div>
<table class="paths"><tr><td>attribution</td><td>path</td></tr>{rows}</table>
<script type="application/json" id="graph-data">{_script_json(graph)}</script>
<script>{_JS}</script>""", extra_css=_CSS)


def write_graph_html(graph: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Write the viewer page atomically."""
    write_text_atomic(path, graph_html(graph, title))
