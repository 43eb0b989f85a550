"""Static HTML feature dashboards (one page per feature) and an index page over many features.

Each page is self-contained (inline CSS and SVG, no scripts, no external files): activation density
and a histogram of nonzero activations, examples grouped into activation bands with every token
shaded by its activation (hover a token for its value), top de-embedding tokens, top and bottom
logit effects, and top pullbacks from the previous transcoder layer. Input: the dicts of
:func:`mechfaith.circuits.dashboard_data.feature_dashboards`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from mechfaith.atomic import write_text_atomic
from mechfaith.reports.page import esc, html_page

_CSS = """
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 18px; }
.stats { font-size: 14px; }
.band { margin: 6px 0 12px 0; }
.example { font-family: monospace; font-size: 13px; margin: 3px 0; white-space: pre-wrap; line-height: 1.6; }
.tok { border-radius: 2px; padding: 0 1px; }
.tok.focus { outline: 1px solid #c05621; }
table.topk { border-collapse: collapse; font-size: 13px; display: inline-table; margin-right: 24px;
             vertical-align: top; }
table.topk td, table.topk th { padding: 2px 8px; border: none; border-bottom: 1px solid #eee;
                               background: none; }
table.index { border-collapse: collapse; font-size: 13px; }
table.index td, table.index th { padding: 3px 10px; border: none; border-bottom: 1px solid #ddd;
                                 background: none; }
"""


def _tok_html(tok: str, act: float, mx: float, focus: bool) -> str:
    alpha = 0.0 if mx <= 0 else max(0.0, min(1.0, act / mx))
    shown = tok.replace("\n", "\u21b5")
    cls = "tok focus" if focus else "tok"
    return (f'<span class="{cls}" style="background: rgba(221,107,32,{alpha:.3f})" '
            f'title="{esc(f"{act:.4g}")}">{esc(shown)}</span>')


def histogram_svg(hist: dict[str, Any], width: int = 420, height: int = 120) -> str:
    counts = hist.get("counts") or []
    edges = hist.get("edges") or []
    if not counts:
        return '<svg class="hist" width="420" height="30"><text x="4" y="20">no activations</text></svg>'
    mx = max(counts) or 1.0
    bw = (width - 40) / len(counts)
    bars = "".join(
        f'<rect class="bar" x="{30 + i * bw:.1f}" y="{height - 20 - (height - 30) * c / mx:.1f}" '
        f'width="{max(bw - 1, 1):.1f}" height="{(height - 30) * c / mx:.1f}" fill="#dd6b20">'
        f'<title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {int(c)}</title></rect>'
        for i, c in enumerate(counts))
    return (f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'{bars}<line x1="30" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}" stroke="#555"/>'
            f'<text x="30" y="{height - 5}">{edges[0]:.3g}</text>'
            f'<text x="{width - 60}" y="{height - 5}">{edges[-1]:.3g}</text></svg>')


def _topk_table(title: str, table: dict[str, Any] | None) -> str:
    if not table:
        return ""
    def rows(items: list[dict[str, Any]]) -> str:
        return "".join(f"<tr><td>{esc(repr(r.get('label', r['index'])))}</td><td>{r['value']:.4g}</td></tr>"
                       for r in items)
    return (f'<table class="topk"><tr><th colspan="2">{esc(title)}: most positive</th></tr>{rows(table["top"])}'
            f'<tr><th colspan="2">most negative</th></tr>{rows(table["bottom"])}</table>')


def feature_page_html(d: dict[str, Any], index_href: str | None = "index.html") -> str:
    """One feature's page."""
    name = d["name"]
    bands = []
    for band in d["bands"]:
        ex = "".join(
            '<div class="example">' + "".join(
                _tok_html(t, a, d["max"], i == e["focus"]) for i, (t, a) in enumerate(zip(e["tokens"], e["acts"])))
            + f' <small>(ctx {e["context"]}, tok {e["pos"]}, act {e["max"]:.3g})</small></div>'
            for e in band["examples"])
        bands.append(f'<div class="band"><h3>{esc(band["label"])} ({band["low"]:.3g}-{band["high"]:.3g}; '
                     f'{band["n_tokens"]} tokens)</h3>{ex or "<i>none</i>"}</div>')
    pull = ""
    if d.get("pullbacks"):
        pull = _topk_table(f"pullback to layer {d['pullback_layer']}", d["pullbacks"])
    back = f'<p><a href="{esc(index_href)}">all features</a></p>' if index_href else ""
    return html_page(str(name), f"""{back}
<h1>Feature {esc(name)}</h1>
<p class="stats">density {d['density']:.4%} of {d['n_tokens']} tokens; max activation {d['max']:.4g}</p>
<h2>Activations (nonzero)</h2>{histogram_svg(d['histogram'])}
<h2>Examples by activation band</h2>{''.join(bands)}
<h2>Input-independent</h2>
{_topk_table('de-embedding', d.get('de_embedding'))}{_topk_table('logit effect', d.get('logit_effects'))}{pull}""",
                     extra_css=_CSS)


def index_html(dashboards: Sequence[dict[str, Any]], title: str = "Feature dashboards") -> str:
    rows = []
    for d in dashboards:
        top = ", ".join(repr(r.get("label", r["index"])) for r in (d.get("de_embedding") or {}).get("top", [])[:5])
        rows.append(f'<tr><td><a href="{esc(page_name(d))}">{esc(d["name"])}</a></td>'
                    f'<td>{d["density"]:.4%}</td><td>{d["max"]:.4g}</td><td>{esc(top)}</td></tr>')
    return html_page(title, f"""<h1>{esc(title)}</h1>
<table class="index"><tr><th>feature</th><th>density</th><th>max</th><th>top de-embedding tokens</th></tr>
{''.join(rows)}</table>""", extra_css=_CSS)


def page_name(d: dict[str, Any]) -> str:
    return f"feature_L{d['layer']}_{d['index']}.html"


def write_dashboards(dashboards: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str],
                     title: str = "Feature dashboards") -> list[Path]:
    """Write one page per feature and ``index.html`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in dashboards:
        p = out / page_name(d)
        write_text_atomic(p, feature_page_html(d))
        paths.append(p)
    idx = out / "index.html"
    write_text_atomic(idx, index_html(dashboards, title))
    return [idx, *paths]
