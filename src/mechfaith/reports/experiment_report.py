"""The memorization experiment (``experiment.json`` from :func:`mechfaith.studies.memorization.run_experiment`)
as one self-contained HTML page: findings, the table of cells (mean ± SD over seeds) and figures of
each metric against the planting rate, one line per (Jacobian coefficient, k)."""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechfaith.atomic import write_text_atomic  # noqa: E402
from mechfaith.reports.faithfulness_report import _figure, _fmt, _num, _png, _table  # noqa: E402

E = html.escape

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


def metric_figure(rows: list[dict[str, Any]], metric: str, ylabel: str) -> str:
    """One line per (Jacobian coefficient, k): the metric's mean ± SD over seeds against the rate."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(_label(r), []).append(r)
    for i, (name, rs) in enumerate(sorted(series.items())):
        rs = sorted(rs, key=lambda r: r["rate"])
        xs = [100 * r["rate"] for r in rs]
        ys = [_num(r.get(metric)) for r in rs]
        es = [_num(r.get(metric + "_sd")) for r in rs]
        es = [0.0 if math.isnan(e) else e for e in es]
        style = "-" if name.startswith("plain") else "--"
        ax.errorbar(xs, ys, yerr=es, fmt=style + "o", capsize=3, label=name, color=f"C{i}", ms=4)
    ax.set_xlabel("passage planted in % of training contexts")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def experiment_html(rep: dict[str, Any], title: str = "Memorization experiment") -> str:
    """The page (module docstring)."""
    cfg = rep.get("config", {})
    data = rep.get("data", {})
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>", f"<title>{E(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #bbb;"
             "padding:3px 6px}th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
             ".figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{width:520px;margin:0}"
             "figcaption{font-size:12px;color:#444}pre{background:#f6f6f6;padding:.5em;font-size:11px;"
             "overflow-x:auto;white-space:pre-wrap}li{margin:.3em 0}</style></head><body>",
             f"<h1>{E(title)}</h1>"]
    parts.append(
        f"<p>Model <b>{E(str(rep.get('model')))}</b>, layer {rep.get('layer')} "
        f"({E(str(rep.get('input_site')))} → {E(str(rep.get('output_site')))}). "
        f"{data.get('train_tokens')} training tokens ({E(str(data.get('train_source')))}), a passage of "
        f"{data.get('passage_tokens')} tokens planted at rates {E(str(cfg.get('rates')))}; TopK "
        f"transcoders with {cfg.get('n_latents')} latents, k in {E(str(cfg.get('ks')))}, "
        f"{cfg.get('steps')} steps of {cfg.get('batch_size')} tokens, Jacobian coefficients "
        f"{E(str(cfg.get('jacobian_coefs')))}, seeds {E(str(cfg.get('seeds')))}. Held out: "
        f"{data.get('eval_tokens')} tokens from {E(str(data.get('eval_source')))}. "
        f"Total time {_fmt(rep.get('seconds'))} s.</p>")
    if rep.get("findings"):
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{E(f)}</li>" for f in rep["findings"]) + "</ul>")
        parts.append("<p>A difference is called clear when it exceeds twice the spread over seeds.</p>")
    rows = rep.get("table", [])
    if rows:
        head = ["rate", "JM coef", "k", "seeds", "memorization", "passage features", "detector flagged",
                "passage/held-out MSE", "same, skip alone", "passage Jac. err.", "held-out Jac. err.", "FVE", "L0",
                "CE increase", "KL", "passage CE increase"]
        body = [[f"{100 * r['rate']:g}%", f"{r['jacobian_coef']:g}", r["k"], r["seeds"],
                 _fmt(r["memorization"], r["memorization_sd"]), _fmt(r["n_passage_features"]),
                 _fmt(r["datapoint_flagged"]), _fmt(r["passage_mse_ratio"], r["passage_mse_ratio_sd"]),
                 _fmt(r.get("skip_passage_mse_ratio")),
                 _fmt(r["passage_jacobian_rel"], r["passage_jacobian_rel_sd"]),
                 _fmt(r["jacobian_rel"], r["jacobian_rel_sd"]), _fmt(r["fve"], r["fve_sd"]), _fmt(r["l0"]),
                 _fmt(r["ce_increase"], r["ce_increase_sd"]), _fmt(r["kl"]),
                 _fmt(r["passage_ce_increase"], r["passage_ce_increase_sd"])] for r in rows]
        parts.append("<h2>Results (mean ± SD over seeds)</h2>")
        parts.append(_table(head, body))
        parts.append("<div class='figs'>")
        for metric, ylabel, caption in FIGURES:
            parts.append(_figure(ylabel, metric_figure(rows, metric, ylabel), caption))
        parts.append("</div>")
    cells = rep.get("cells", [])
    if cells:
        parts.append("<h2>Every cell</h2>")
        parts.append(_table(["cell", "planted contexts", "memorization", "passage features", "FVE",
                             "Jac. err.", "CE increase", "train s", "top passage features (index: output share)"],
                            [[c["name"], c.get("planted_contexts"), _fmt(c["metrics"]["memorization"]),
                              c["metrics"]["n_passage_features"], _fmt(c["metrics"]["fve"]),
                              _fmt(c["metrics"]["jacobian_rel"]), _fmt(c["metrics"]["ce_increase"]),
                              _fmt(c.get("train_seconds")),
                              ", ".join(f"{p['index']}: {p['max_output_share']:.2f}"
                                        for p in c["metrics"]["passage_features"][:5])] for c in cells]))
    parts.append("<h2>The passage</h2><pre>" + E(str(rep.get("passage", ""))) + "</pre>")
    parts.append("<h2>Configuration</h2><pre>" + E(json.dumps({"config": cfg, "corpus": rep.get("corpus"),
                                                                "data": data}, indent=1, sort_keys=True)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_experiment_html(rep: dict[str, Any], path: str | os.PathLike[str],
                          title: str = "Memorization experiment") -> None:
    """Write the page atomically."""
    write_text_atomic(path, experiment_html(rep, title))


__all__ = ["experiment_html", "metric_figure", "write_experiment_html"]
