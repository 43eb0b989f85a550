"""The memorization experiment (``experiment.json`` from :func:`mechfaith.studies.memorization.run_experiment`)
as one self-contained HTML page: findings, the table of cells (mean ± SD over seeds) and figures of
each metric against the planting rate, one line per (Jacobian coefficient, k)."""

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
    ("fve", "FVE (held out)", "Fraction of the MLP output's variance explained on held-out tokens."),
    ("ce_increase", "spliced CE − clean CE (nats)",
     "Next-token loss increase when the transcoder replaces the MLP, held-out contexts."),
)


def _label(row: dict[str, Any]) -> str:
    jm = "plain" if row["jacobian_coef"] == 0 else f"JM {row['jacobian_coef']:g}"
    return f"{jm}, k={row['k']}"


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
        style = "-" if name.startswith("plain") else "--"
        ax.errorbar(xs, ys, yerr=es, fmt=style + "o", capsize=3, label=name, color=f"C{i}", ms=4)
    ax.set_xlabel("passage planted in % of training contexts")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def experiment_html(rep: dict[str, Any], title: str = "Memorization experiment") -> str:
    """The page (module docstring)."""
    cfg = rep.get("config", {})
    data = rep.get("data", {})
    parts = [f"<h1>{esc(title)}</h1>"]
    parts.append(
        f"<p>Model <b>{esc(rep.get('model'))}</b>, layer {rep.get('layer')} "
        f"({esc(rep.get('input_site'))} → {esc(rep.get('output_site'))}). "
        f"{data.get('train_tokens')} training tokens ({esc(data.get('train_source'))}), a passage of "
        f"{data.get('passage_tokens')} tokens planted at rates {esc(cfg.get('rates'))}; TopK "
        f"transcoders with {cfg.get('n_latents')} latents, k in {esc(cfg.get('ks'))}, "
        f"{cfg.get('steps')} steps of {cfg.get('batch_size')} tokens, Jacobian coefficients "
        f"{esc(cfg.get('jacobian_coefs'))}, seeds {esc(cfg.get('seeds'))}. Held out: "
        f"{data.get('eval_tokens')} tokens from {esc(data.get('eval_source'))}. "
        f"Total time {fmt_value(rep.get('seconds'))} s.</p>")
    if rep.get("findings"):
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{esc(f)}</li>" for f in rep["findings"]) + "</ul>")
        parts.append("<p>A difference is called clear when it exceeds twice the spread over seeds.</p>")
    rows = rep.get("table", [])
    if rows:
        head = ["rate", "JM coef", "k", "seeds", "memorization", "passage features", "detector flagged",
                "passage/held-out MSE", "same, skip alone", "passage Jac. err.", "held-out Jac. err.", "FVE", "L0",
                "CE increase", "KL", "passage CE increase"]
        body = [[f"{100 * r['rate']:g}%", f"{r['jacobian_coef']:g}", r["k"], r["seeds"],
                 fmt_value(r["memorization"], r["memorization_sd"]), fmt_value(r["n_passage_features"]),
                 fmt_value(r["datapoint_flagged"]), fmt_value(r["passage_mse_ratio"], r["passage_mse_ratio_sd"]),
                 fmt_value(r.get("skip_passage_mse_ratio")),
                 fmt_value(r["passage_jacobian_rel"], r["passage_jacobian_rel_sd"]),
                 fmt_value(r["jacobian_rel"], r["jacobian_rel_sd"]), fmt_value(r["fve"], r["fve_sd"]), fmt_value(r["l0"]),
                 fmt_value(r["ce_increase"], r["ce_increase_sd"]), fmt_value(r["kl"]),
                 fmt_value(r["passage_ce_increase"], r["passage_ce_increase_sd"])] for r in rows]
        parts.append("<h2>Results (mean ± SD over seeds)</h2>")
        parts.append(table_html(head, body))
        parts.append("<div class='figs'>")
        for metric, ylabel, caption in FIGURES:
            parts.append(figure_html(ylabel, metric_figure(rows, metric, ylabel), caption))
        parts.append("</div>")
    cells = rep.get("cells", [])
    if cells:
        parts.append("<h2>Every cell</h2>")
        parts.append(table_html(["cell", "planted contexts", "memorization", "passage features", "FVE",
                             "Jac. err.", "CE increase", "train s", "top passage features (index: output share)"],
                            [[c["name"], c.get("planted_contexts"), fmt_value(c["metrics"]["memorization"]),
                              c["metrics"]["n_passage_features"], fmt_value(c["metrics"]["fve"]),
                              fmt_value(c["metrics"]["jacobian_rel"]), fmt_value(c["metrics"]["ce_increase"]),
                              fmt_value(c.get("train_seconds")),
                              ", ".join(f"{p['index']}: {p['max_output_share']:.2f}"
                                        for p in c["metrics"]["passage_features"][:5])] for c in cells]))
    parts.append("<h2>The passage</h2><pre>" + esc(rep.get("passage", "")) + "</pre>")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps({"config": cfg, "corpus": rep.get("corpus"),
                                                                "data": data}, indent=1, sort_keys=True)) + "</pre>")
    return html_page(title, "\n".join(parts), extra_css=EXTRA_CSS)


def write_experiment_html(rep: dict[str, Any], path: str | os.PathLike[str],
                          title: str = "Memorization experiment") -> None:
    """Write the page atomically."""
    write_text_atomic(path, experiment_html(rep, title))


__all__ = ["experiment_html", "metric_figure", "write_experiment_html"]
