"""A self-contained HTML viewer of an attribution graph (inline SVG + JavaScript, no external files).

Input: the own JSON format of :func:`mechfaith.circuits.graph_json.graph_to_json` (kept nodes and
links). Prompt positions run along the x axis (the token strings label the columns at the
bottom), depth along the y axis: embeddings at the bottom, then one row per layer (its features and
error node), the logits on top. Node size follows influence (logits: probability), colour the kind
(features orange, errors grey, tokens blue, logits red); links are blue when positive, red when
negative, wider when stronger.

Controls: an "error nodes" checkbox (hides error nodes and their links), a range slider hiding the
links whose |weight| is below a share of the largest one (it starts where the 500 strongest links
show, so that a long prompt's graph is readable at first sight), and a summary line with both scores and
the counts. Hovering a node shows its name, kind, layer, position, activation, influence, token
and its strongest incoming and outgoing links (and fades the links not touching it). Clicking a
feature node that has an entry in ``dashboard_links`` (node id -> URL relative to the page, e.g.
``dashboards/feature_8_355.html``) opens that dashboard in the same tab; features without one do
nothing. The graph JSON is embedded, so the page opens anywhere, offline.
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
#controls { font-size: 13px; margin-bottom: 8px; display: flex; gap: 24px; align-items: center; }
#wrap { display: flex; gap: 16px; align-items: flex-start; }
#graph-box { flex: 1 1 auto; min-width: 0; overflow-x: auto; }
#graph { flex: none; display: block; }
#details { font-size: 12px; min-width: 280px; max-width: 380px; border: 1px solid #ccc; padding: 8px;
           border-radius: 4px; background: #fafafa; white-space: pre-wrap; font-family: monospace; }
svg text { font-size: 10px; fill: #333; }
svg text.tok { font-size: 11px; fill: #000; }
.node { stroke: #222; stroke-width: 0.7; }
.node.error { stroke-dasharray: 2 1; }
.node.has-dashboard { cursor: pointer; stroke: #1a365d; stroke-width: 2; }
.link { fill: none; }
.node:hover { opacity: 0.7; }
"""

_JS = r"""
(function () {
  const g = JSON.parse(document.getElementById('graph-data').textContent);
  const dash = JSON.parse(document.getElementById('dashboard-links').textContent);
  const svgNS = 'http://www.w3.org/2000/svg';
  const svg = document.getElementById('graph');
  const details = document.getElementById('details');
  const showErr = document.getElementById('show-errors');
  const slider = document.getElementById('edge-filter');
  const nL = g.n_layers, nPos = g.tokens.length, nRows = nL + 2;
  const MAX_DEFAULT_LINKS = 500;
  const colors = {feature: '#f6ad55', error: '#a0aec0', token: '#63b3ed', logit: '#fc8181'};
  const byId = {};
  g.nodes.forEach(n => { byId[n.id] = n; n.inLinks = []; n.outLinks = []; });
  const links = g.links.filter(e => byId[e.source] && byId[e.target]);
  links.forEach(e => { byId[e.source].outLinks.push(e); byId[e.target].inLinks.push(e); });
  const maxW = links.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 1e-30);
  const size = n => n.kind === 'logit' ? (n.probability || 0) : Math.max(0, n.influence || 0);
  const maxOf = kindIsLogit => g.nodes.filter(n => (n.kind === 'logit') === kindIsLogit)
    .reduce((m, n) => Math.max(m, size(n)), 1e-30);
  const maxInfl = maxOf(false), maxProb = maxOf(true);
  const avail = Math.max(500, document.getElementById('graph-box').clientWidth || 900);
  const colW = Math.max(22, Math.min(140, (avail - 90) / Math.max(1, nPos)));
  const slanted = colW < 56;  // narrow columns: token labels at 45 degrees
  const rowH = Math.max(26, Math.min(80, 640 / nRows));
  const left = 70, top = 30, width = left + nPos * colW + 20, height = top + nRows * rowH + (slanted ? 80 : 40);
  svg.setAttribute('width', width); svg.setAttribute('height', height);
  const yOfRow = r => top + (nRows - 1 - r) * rowH + rowH / 2;
  const at = {};
  const cells = {};
  g.nodes.forEach(n => { const k = n.pos + ':' + (n.layer + 1); (cells[k] = cells[k] || []).push(n); });
  const labelY = {};
  Object.values(cells).forEach(list => {
    list.sort((a, b) => size(b) - size(a));
    const cx = left + list[0].pos * colW + colW / 2, m = list.length;
    if (list[0].kind === 'logit') {  // the logit row is empty elsewhere: spread leftwards, most probable first
      const step = Math.min(26, (Math.min(nPos, 4) * colW - 16) / Math.max(1, m));
      list.forEach((n, i) => {
        at[n.id] = [cx - (m - 1 - i) * step, yOfRow(nRows - 1)];
        if (step >= 18 || i === 0) labelY[n.id] = yOfRow(nRows - 1) - (i % 2 ? 12 : 22);
      });
      return;
    }
    const step = Math.min(16, (colW - 16) / Math.max(1, m));
    list.forEach((n, i) => { at[n.id] = [cx + (i - (m - 1) / 2) * step, yOfRow(n.layer + 1)]; });
  });
  const fmt = v => (typeof v === 'number') ? v.toPrecision(4) : String(v);
  const shortTok = t => { const s = String(t).replace(/\n/g, '\u23ce').replace(/\t/g, '\u2192');
    return s.length > 12 ? s.slice(0, 11) + '\u2026' : s; };
  function el(name, attrs, parent) {
    const e = document.createElementNS(svgNS, name);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
    (parent || svg).appendChild(e);
    return e;
  }
  function describe(n) {
    const lines = [n.id, 'kind: ' + n.kind, 'layer: ' + n.layer, 'pos: ' + n.pos];
    if (n.feature !== undefined) lines.push('feature: ' + n.feature);
    if (n.activation !== undefined) lines.push('activation: ' + fmt(n.activation));
    lines.push('influence: ' + fmt(n.influence));
    if (n.probability !== undefined) lines.push('probability: ' + fmt(n.probability));
    if (n.token !== undefined) lines.push('token: ' + JSON.stringify(n.token));
    if (n.token_id !== undefined) lines.push('token id: ' + n.token_id);
    if (dash[n.id]) lines.push('click: dashboard ' + dash[n.id]);
    const top = (list, key, arrow) => list.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight))
      .slice(0, 6).map(e => '  ' + arrow + ' ' + e[key] + '  ' + fmt(e.weight));
    if (n.inLinks.length) lines.push('incoming (' + n.inLinks.length + '):', ...top(n.inLinks, 'source', '\u2190'));
    if (n.outLinks.length) lines.push('outgoing (' + n.outLinks.length + '):', ...top(n.outLinks, 'target', '\u2192'));
    return lines.join('\n');
  }
  function draw() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const withErr = showErr.checked;
    const cut = Number(slider.value) / 100 * maxW;
    document.getElementById('edge-share').textContent = slider.value + '%';
    for (let r = 0; r < nRows; r++) {
      const y = yOfRow(r);
      el('line', {x1: left, x2: width - 10, y1: y, y2: y, stroke: '#eee'});
      el('text', {x: 4, y: y + 3, class: 'row'}).textContent =
        r === 0 ? 'embeddings' : (r === nRows - 1 ? 'logits' : 'layer ' + (r - 1));
    }
    for (let p = 0; p < nPos; p++) {
      const tok = g.token_strings ? g.token_strings[p] : String(g.tokens[p]);
      const tx = left + p * colW + colW / 2, ty = top + nRows * rowH + 10;
      const t = el('text', slanted
        ? {x: tx, y: ty, class: 'tok', 'text-anchor': 'end', transform: `rotate(-45 ${tx} ${ty})`, 'data-pos': p}
        : {x: tx, y: height - 14, class: 'tok', 'text-anchor': 'middle', 'data-pos': p});
      t.textContent = shortTok(tok);
      el('title', {}, t).textContent = p + ': ' + JSON.stringify(tok);
    }
    const visible = n => withErr || n.kind !== 'error';
    const shown = links.filter(e => visible(byId[e.source]) && visible(byId[e.target]) && Math.abs(e.weight) >= cut);
    document.getElementById('link-count').textContent = String(shown.length);
    const paths = shown.map(e => {
      const [x1, y1] = at[e.source], [x2, y2] = at[e.target], my = (y1 + y2) / 2;
      const p = el('path', {d: `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`, class: 'link',
        stroke: e.weight >= 0 ? '#2b6cb0' : '#c53030', 'stroke-opacity': 0.5,
        'stroke-width': (0.4 + 5 * Math.abs(e.weight) / maxW).toFixed(2)});
      el('title', {}, p).textContent = `${e.source} \u2192 ${e.target}: ${fmt(e.weight)}`;
      return [p, e];
    });
    g.nodes.filter(visible).forEach(n => {
      const [x, y] = at[n.id];
      const rel = n.kind === 'logit' ? size(n) / maxProb : size(n) / maxInfl;
      const c = el('circle', {cx: x, cy: y, r: (3 + 8 * Math.sqrt(rel)).toFixed(2), fill: colors[n.kind] || '#ccc',
        class: 'node ' + n.kind + (dash[n.id] ? ' has-dashboard' : ''), 'data-id': n.id, 'data-kind': n.kind});
      el('title', {}, c).textContent = describe(n);
      c.addEventListener('mouseenter', () => {
        details.textContent = describe(n);
        paths.forEach(([p, e]) => p.setAttribute('stroke-opacity', e.source === n.id || e.target === n.id ? 0.9 : 0.06));
      });
      c.addEventListener('mouseleave', () => paths.forEach(([p]) => p.setAttribute('stroke-opacity', 0.5)));
      if (n.kind === 'feature' && dash[n.id]) c.addEventListener('click', () => { window.location.href = dash[n.id]; });
      if (labelY[n.id] !== undefined) {
        el('text', {x: x, y: labelY[n.id], 'text-anchor': 'middle', class: 'logit-label'}).textContent =
          n.token !== undefined ? shortTok(n.token) : '#' + n.token_id;
      }
    });
  }
  showErr.addEventListener('change', draw);
  slider.addEventListener('input', draw);
  if (links.length > MAX_DEFAULT_LINKS) {  // start with the strongest links only; the slider shows the rest
    const w = links.map(e => Math.abs(e.weight)).sort((a, b) => b - a)[MAX_DEFAULT_LINKS - 1];
    slider.value = String(Math.ceil(1000 * w / maxW) / 10);
  }
  draw();
})();
"""


def _script_json(data: Any) -> str:
    return json.dumps(data).replace("</", "<\\/")


def summary_line(graph_json: dict[str, Any]) -> str:
    """Both scores and the counts, in one line of text."""
    c = graph_json.get("counts", {})
    t = graph_json.get("target", {})
    rs, cs = graph_json.get("replacement_score"), graph_json.get("completeness_score")
    score = (lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "?")
    n_logits = len(t.get("tokens", []))
    target = f"{n_logits} logit{'s' if n_logits != 1 else ''} at position {t.get('pos', '?')}" + \
        (f" (difference with token {t['minus']})" if t.get("minus", -1) >= 0 else "")
    return (f"replacement score {score(rs)}, completeness score {score(cs)}; "
            f"{len(graph_json.get('nodes', []))} nodes kept ({c.get('kept_features', '?')} of "
            f"{c.get('feature_nodes', '?')} feature nodes, {c.get('active_features', '?')} active features; "
            f"{c.get('kept_errors', '?')} error nodes), {len(graph_json.get('links', []))} links; target: {target}")


def attribution_graph_html(graph_json: dict[str, Any], title: str,
                           dashboard_links: dict[str, str] | None = None) -> str:
    """The viewer page of a graph in the own JSON format."""
    n_links = len(graph_json.get("links", []))
    return html_page(title, f"""<h1>{esc(title)}</h1>
<div id="summary">{esc(summary_line(graph_json))}</div>
<div id="controls"><label><input type="checkbox" id="show-errors" checked> error nodes</label>
<label>hide links below <input type="range" id="edge-filter" min="0" max="100" step="0.1" value="0">
<span id="edge-share">0%</span> of the largest |weight|</label>
<span><span id="link-count">{n_links}</span> of {n_links} links shown</span></div>
<div id="wrap"><div id="graph-box"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg></div>
<div id="details">Hover a node for details; click a feature with a thick outline for its dashboard.</div></div>
<script type="application/json" id="graph-data">{_script_json(graph_json)}</script>
<script type="application/json" id="dashboard-links">{_script_json(dashboard_links or {})}</script>
<script>{_JS}</script>""", extra_css=_CSS)


def write_attribution_graph_html(graph_json: dict[str, Any], path: str | os.PathLike[str], title: str,
                                 dashboard_links: dict[str, str] | None = None) -> None:
    """Write the viewer page atomically (``dashboard_links``: node id -> URL relative to the page)."""
    write_text_atomic(path, attribution_graph_html(graph_json, title, dashboard_links))
