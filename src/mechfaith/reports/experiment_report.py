"""The memorization experiment (``experiment.json`` from :func:`mechfaith.studies.memorization.run_experiment`)
as one self-contained HTML page: findings, the table of cells (mean ± SD over seeds), figures of
each metric against the planting rate (one line per site, arm, k and Jacobian coefficient), every
cell with its passage-specific features and their top tokens, and the passages."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from mechfaith.atomic import write_text_atomic
from mechfaith.reports.figures import png_bytes, pyplot
from mechfaith.reports.page import esc, figure_html, html_page, table_html
from mechfaith.reports.values import as_float, fmt_value

EXTRA_CSS = ".figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{width:520px;margin:0}figcaption{font-size:12px}"

# (metric, axis label, what it shows)
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("memorization", "passage output share of passage features",
     "Memorization: the share of the MLP's output on the passage written by features that fire on "
     "the passage and (almost) never on held-out text. 0 for a coder with no features of its own "
     "for the passage."),
    ("passage_mse_ratio", "passage MSE / held-out MSE",
     "How much better the coder fits the passage than ordinary held-out text (below 1: better)."),
    ("passage_jacobian_rel", "Jacobian rel. error on the passage",
     "E||J_mlp v − J_tc v||² / E||J_mlp v||² on the passage's tokens (the repeated inputs)."),
    ("jacobian_rel", "Jacobian rel. error (held out)",
     "The same estimator on held-out tokens: the cost or gain of Jacobian matching in general."),
    ("n_specific_features", "features >= 10x more active on the passage",
     "Passage-specific features: largest activation on the passage at least 10x the largest on any "
     "held-out token (the looser datapoint-feature criterion)."),
    ("passage_feature_share", "features' share of the passage output",
     "The share of the MLP's output on the passage written by the coder's features (the rest of its "
     "fit is the linear part: skip and bias)."),
    ("fve", "FVE (held out)", "Fraction of the MLP output's variance explained on held-out tokens."),
    ("ce_increase", "spliced CE − clean CE (nats)",
     "Next-token loss increase when the transcoder replaces the MLP, held-out contexts."),
)


def _label(row: dict[str, Any]) -> str:
    jm = "plain" if row["jacobian_coef"] == 0 else f"JM {row['jacobian_coef']:g}"
    k = f" k={row['k']}" if row.get("k") else ""
    return f"{row.get('passage', '')} L{row.get('layer', '')} {row.get('arm', '')}{k}, {jm}"


def metric_figure(rows: list[dict[str, Any]], metric: str, ylabel: str) -> bytes:
    """One line per (Jacobian coefficient, k): the metric's mean ± SD over seeds against the rate (PNG)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(_label(r), []).append(r)
    for i, (name, rs) in enumerate(sorted(series.items())):
        rs = sorted(rs, key=lambda r: r["rate"])
        xs = [100 * r["rate"] for r in rs]
        ys = [as_float(r.get(metric)) for r in rs]
        es = [as_float(r.get(metric + "_sd")) for r in rs]
        es = [0.0 if math.isnan(e) else e for e in es]
        style = "--" if "JM" in name else "-"
        ax.errorbar(xs, ys, yerr=es, fmt=style + "o", capsize=3, label=name, color=f"C{i % 10}", ms=4)
    ax.set_xlabel("passage planted in % of training contexts")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5)
    return png_bytes(fig)


def _intro(rep: dict[str, Any]) -> str:
    cfg = rep.get("config", {})
    data = rep.get("data", {})
    first: dict[str, Any] = next(iter(data.values()), {}) if isinstance(data, dict) else {}
    return (
        f"<p>Model <b>{esc(rep.get('model'))}</b>, layers {esc(rep.get('layers'))} "
        f"({esc(rep.get('input_site'))} → {esc(rep.get('output_site'))}). "
        f"{first.get('train_tokens')} training tokens ({esc(first.get('train_source'))}); passages "
        f"{esc(list(rep.get('passages', {})))} planted at rates {esc(cfg.get('rates'))}. Arms at the main site "
        f"({esc(cfg.get('passages', [''])[0])}, layer {esc(rep.get('layers', [''])[0])}): {esc(cfg.get('arms'))}; "
        f"at the other sites: {esc(cfg.get('other_site_arms'))}. {cfg.get('n_latents')} latents; TopK k in "
        f"{esc(cfg.get('ks'))}; relu-tanh: tanh-L1 λ {cfg.get('tanh_coef')}, c {cfg.get('tanh_c')}; jumprelu: "
        f"L0 λ {cfg.get('jumprelu_coef')}; {cfg.get('steps')} steps of {cfg.get('batch_size')} tokens; "
        f"Jacobian coefficients {esc(cfg.get('jacobian_coefs'))}, seeds {esc(cfg.get('seeds'))}. Held out: "
        f"{first.get('eval_tokens')} tokens from {esc(first.get('eval_source'))}. "
        f"Total time {fmt_value(rep.get('seconds'))} s.</p>")


TABLE_HEAD = ["passage", "layer", "arm", "k", "rate", "JM coef", "seeds", "memorization", "passage features",
              "detector flagged", "10x features", "10x share", "passage/held-out MSE", "same, linear part alone",
              "linear share passage (held out)", "feature share passage (held out)", "passage Jac. err.",
              "held-out Jac. err.", "FVE (train)", "L0", "CE increase", "KL", "passage CE increase"]


def _table_row(r: dict[str, Any]) -> list[Any]:
    def pair(a: str, b: str) -> str:
        return f"{fmt_value(r.get(a))} ({fmt_value(r.get(b))})"

    return [r.get("passage"), r.get("layer"), r.get("arm"), r["k"] or "-", f"{100 * r['rate']:g}%",
            f"{r['jacobian_coef']:g}", r["seeds"], fmt_value(r["memorization"], r["memorization_sd"]),
            fmt_value(r["n_passage_features"]), fmt_value(r["datapoint_flagged"]),
            fmt_value(r.get("n_specific_features")), fmt_value(r.get("specific_share")),
            fmt_value(r["passage_mse_ratio"], r["passage_mse_ratio_sd"]), fmt_value(r.get("linear_passage_mse_ratio")),
            pair("passage_linear_share", "heldout_linear_share"), pair("passage_feature_share", "heldout_feature_share"),
            fmt_value(r["passage_jacobian_rel"], r["passage_jacobian_rel_sd"]),
            fmt_value(r["jacobian_rel"], r["jacobian_rel_sd"]), pair("fve", "train_fve"), fmt_value(r["l0"]),
            fmt_value(r["ce_increase"], r["ce_increase_sd"]), fmt_value(r["kl"]),
            fmt_value(r["passage_ce_increase"], r["passage_ce_increase_sd"])]


def _specific_text(m: dict[str, Any]) -> str:
    """A cell's passage-specific features: index, top tokens with activations, passage/held-out ratio."""
    out = []
    for f in m.get("specific_features", [])[:5]:
        toks = " ".join(f"{t['token']!r}:{t['activation']:.2g}" for t in f.get("top_tokens", []))
        ratio = "∞ (never on held-out text)" if f.get("ratio") is None else fmt_value(f["ratio"])
        out.append(f"{f['index']} [{toks}] x{ratio}")
    return "; ".join(out)


def _cells_table(cells: list[dict[str, Any]]) -> str:
    head = ["cell", "planted contexts", "memorization", "passage features", "10x features", "FVE", "Jac. err.",
            "CE increase", "train s", "top passage features (index: output share)",
            "10x features (index [top tokens:activation] passage/held-out ratio)"]
    body = [[c["name"], c.get("planted_contexts"), fmt_value(c["metrics"]["memorization"]),
             c["metrics"]["n_passage_features"], c["metrics"].get("n_specific_features"),
             fmt_value(c["metrics"]["fve"]), fmt_value(c["metrics"]["jacobian_rel"]),
             fmt_value(c["metrics"]["ce_increase"]), fmt_value(c.get("train_seconds")),
             ", ".join(f"{p['index']}: {p['max_output_share']:.2f}" for p in c["metrics"]["passage_features"][:5]),
             _specific_text(c["metrics"])] for c in cells]
    return table_html(head, body)


def experiment_html(rep: dict[str, Any], title: str = "Memorization experiment") -> str:
    """The page (module docstring)."""
    parts = [f"<h1>{esc(title)}</h1>", _intro(rep)]
    if rep.get("findings"):
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{esc(f)}</li>" for f in rep["findings"]) + "</ul>")
        parts.append("<p>A difference is called clear when it exceeds twice the spread over seeds. The linear "
                     "part is the decoder bias plus the skip (when the arm has one); shares are of the MLP's "
                     "output, <i>part · y / ‖y‖²</i>, averaged over tokens.</p>")
    rows = rep.get("table", [])
    if rows:
        parts.append("<h2>Results (mean ± SD over seeds)</h2>")
        parts.append(table_html(TABLE_HEAD, [_table_row(r) for r in rows]))
        parts.append("<div class='figs'>")
        for metric, ylabel, caption in FIGURES:
            parts.append(figure_html(ylabel, metric_figure(rows, metric, ylabel), caption))
        parts.append("</div>")
    cells = rep.get("cells", [])
    if cells:
        parts.append("<h2>Every cell</h2>")
        parts.append(_cells_table(cells))
    for name, text in rep.get("passages", {}).items():
        parts.append(f"<h2>The passage '{esc(name)}'</h2><pre>" + esc(text) + "</pre>")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps({"config": rep.get("config", {}),
                                                                "corpus": rep.get("corpus"),
                                                                "data": rep.get("data", {})},
                                                               indent=1, sort_keys=True)) + "</pre>")
    return html_page(title, "\n".join(parts), extra_css=EXTRA_CSS)


def write_experiment_html(rep: dict[str, Any], path: str | os.PathLike[str],
                          title: str = "Memorization experiment") -> None:
    """Write the page atomically."""
    write_text_atomic(path, experiment_html(rep, title))


__all__ = ["experiment_html", "metric_figure", "write_experiment_html"]
