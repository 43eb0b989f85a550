"""The toy report: metrics.json, PNG figures, a self-contained report.html and report.md.

The HTML embeds every figure as a base64 ``data:`` URI, so the single file opens anywhere; the
markdown carries the same numbers and links the PNGs next to it. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechfaith.atomic import write_text_atomic
from mechfaith.jsonio import json_safe
from mechfaith.reports import plots
from mechfaith.reports.page import esc, figure_html, html_page, table_html
from mechfaith.reports.values import fmt_value
from mechfaith.toy.experiments import EXTRA_SETTINGS, MAIN_SETTINGS, ToyRun
from mechfaith.toy.library import library_sample

COLUMNS = [("memorization", "memorization"), ("n_datapoint_features", "datapoint features"),
           ("offdiag_jacobian_at_p", "off-diag |J| at p"), ("jacobian_error_at_p", "‖J−J_mlp‖_F at p"),
           ("val_mse", "val MSE"), ("val_fvu", "val FVU"), ("l0", "L0"),
           ("p_feature_residual", "residual of +x1..3 features"),
           ("max_weight_product", "max ‖W_enc‖‖W_dec‖"), ("n_large_weight_features", "masking features")]


def _selected_features(run: ToyRun, name: str) -> list[int]:
    """The features active at p (largest first), then those whose best circuit is +x_j, j in supp p."""
    coder, p = run.examples[name], run.p
    assert p is not None, "a finished ToyRun has its datapoint p"
    with torch.no_grad():
        f = coder.forward_full(p.unsqueeze(0)).f[0]
    chosen = [int(i) for i in torch.argsort(f, descending=True) if float(f[i]) > 0][:4]
    dec = run.decompositions.get(name)
    if dec is not None:
        rows = {dec.names.index(f"+x{j + 1}") for j in torch.nonzero(p != 0).flatten().tolist()}
        best = dec.best()
        chosen += [i for i in dec.order() if int(best[i]) in rows and i not in chosen]
    return chosen[:7]


def figures(run: ToyRun, out: Path) -> dict[str, dict[str, str]]:
    """Write every PNG; return {file name: {title, caption}} in display order."""
    figs: dict[str, dict[str, str]] = {}
    cfg, p = run.config, run.p
    assert p is not None, "a finished ToyRun has its datapoint p"
    for name, dec in run.decompositions.items():
        fn = f"circuit_map_{name}.png"
        plots.circuit_map_figure(dec, f"circuit-library map: {name} (seed {cfg.seed})", out / fn)
        figs[fn] = {"title": f"Circuit-library map: {name}",
                    "caption": "Each column is a learned feature (dead ones omitted), ordered by the ideal "
                               "circuit that explains most of it, so a faithful coder shows a diagonal. "
                               "Colour: share of the feature's contribution over a shared sample that the "
                               "circuit accounts for (non-negative lasso); the bottom row is the residual "
                               "(what no library circuit explains). A datapoint feature is a bright cell "
                               "in the 'datapoint' row."}
    jacs = {"ground truth (abs MLP)": torch.diag(torch.sign(p))}
    for name, coder in run.examples.items():
        jacs[name] = coder.jacobian(p.unsqueeze(0))[0].detach()
    plots.jacobian_figure(jacs, min(cfg.d, cfg.n_ones + 2), out / "jacobian_at_p.png")
    figs["jacobian_at_p.png"] = {
        "title": "Jacobian at the repeated datapoint p",
        "caption": "The coder's exact Jacobian W_dec^T diag(1[pre>0]) W_enc^T at p, first dims. The true "
                   "MLP has diag(1,1,1,0,...) (ReLU'(0)=0). A datapoint feature makes every output "
                   "depend on every input of p: large off-diagonal entries."}
    for name in MAIN_SETTINGS:
        if name in run.examples:
            fn = f"feature_weights_{name}.png"
            plots.feature_weights_figure(run.examples[name], _selected_features(run, name),
                                         f"features at p: {name}", out / fn)
            figs[fn] = {"title": f"Weights of selected features: {name}",
                        "caption": "Encoder column (what the feature reads), bias, and decoder row (what "
                                   "it writes) of the features that fire on p (largest activation first), "
                                   "then of the features that best match the +x1..+x3 circuits. "
                                   "An ideal feature reads and writes one coordinate; a datapoint feature "
                                   "reads and writes p, with a large negative bias."}
    scan = run.metrics["scan"]
    plots.scan_figure(scan["repeat_frac"], scan["sparsity_coef"], np.array(scan["memorization"]),
                      out / "scan.png")
    sp = scan["spearman"]
    figs["scan.png"] = {
        "title": "Scan: repeat_frac × sparsity coefficient",
        "caption": "Memorization of each cell (mean over seeds). Dashed lines: repeat_frac·λ = const. "
                   f"Spearman rank correlation of memorization with repeat_frac·λ: {fmt_value(sp['product'], spec='.3g')}; "
                   f"with repeat_frac alone: {fmt_value(sp['repeat_frac'], spec='.3g')}; with λ alone: "
                   f"{fmt_value(sp['sparsity_coef'], spec='.3g')}."}
    masking = {k: v for k, v in run.examples.items() if "jacobian" in k or k.endswith("l1")}
    if masking:
        x = library_sample(p, 2000, cfg.density, 0.05, seed=cfg.seed + 40_000)
        plots.masking_figure(masking, x, out / "gradient_masking.png")
        figs["gradient_masking.png"] = {
            "title": "Gradient masking check (L1 vs tanh-L1, with and without Jacobian matching)",
            "caption": "Every live latent of one seed per setting: bias against the product of its "
                       "encoder and decoder norms. Gradient masking would appear as large products with "
                       "very negative biases (few, large-gradient activations)."}
    return figs


def _table_rows(settings: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in MAIN_SETTINGS + EXTRA_SETTINGS:
        if name not in settings:
            continue
        s = settings[name]
        sp = s["spec"]
        desc = (f"rf={sp['repeat_frac']:g}, {sp['penalty']} λ={sp['sparsity_coef']:g}"
                + (f", jac={sp['jacobian_coef']:g}" if sp["jacobian_coef"] else "")
                + (f", jcp={sp['jac_contrib_coef']:g}" if sp["jac_contrib_coef"] else ""))
        cells = [name, desc, str(len(s["seeds"]))]
        for key, _ in COLUMNS:
            cells.append(fmt_value(s[key], s.get(f"{key}_std"), spec=".3g"))
        cells.append(f"{s['seeds_with_datapoint_feature']}/{len(s['seeds'])}")
        cells.append(", ".join(f"{v:.2f}" for v in s["memorization_seeds"]))
        rows.append(cells)
    return rows


HEAD = ["setting", "hyperparameters", "seeds"] + [c for _, c in COLUMNS] + ["seeds with a datapoint feature",
                                                                           "memorization per seed"]

INTRO = ("Reproduction of <em>A Toy Model of Mechanistic (Un)Faithfulness</em>: transcoders trained to "
         "imitate a ReLU MLP that computes y = |x| with 2d neurons, on sparse inputs, with and without a "
         "repeated datapoint p = [1,1,1,0,...], and with Jacobian matching. Numbers are mean ± std "
         "over seeds; all coders of the run were trained at once as one batched model.")


def _findings(settings: dict[str, Any]) -> list[str]:
    """Plain-language notes computed from the numbers (gradient masking, L1 vs tanh-L1, the penalty)."""
    out = []
    jac = {k: v for k, v in settings.items() if "jacobian" in k}
    if jac:
        worst = max(jac.values(), key=lambda s: s["max_weight_product"])
        n_mask = sum(s["n_large_weight_features"] for s in jac.values())
        out.append(f"Gradient masking: Jacobian-matched coders have {n_mask:g} live features with "
                   f"||W_enc|| ||W_dec|| > 2 and bias < -0.5 (mean over seeds, summed over settings); the "
                   f"largest weight product is {worst['max_weight_product']:.2f} (ideal features: 1).")
    if "repetition_jacobian_l1" in settings and "repetition_jacobian" in settings:
        a, b = settings["repetition_jacobian"], settings["repetition_jacobian_l1"]
        out.append(f"L1 vs tanh-L1 under Jacobian matching: L0 {b['l0']:.2f} vs {a['l0']:.2f}, val FVU "
                   f"{b['val_fvu']:.3f} vs {a['val_fvu']:.3f}, memorization {b['memorization']:.3f} vs "
                   f"{a['memorization']:.3f}.")
    if "repetition_jcp" in settings and "repetition" in settings:
        a, b = settings["repetition"], settings["repetition_jcp"]
        out.append(f"Jacobian-contribution penalty alone (no Jacobian matching): memorization "
                   f"{b['memorization']:.3f} vs {a['memorization']:.3f} without it; with Jacobian matching: "
                   f"{settings.get('repetition_jacobian_jcp', {}).get('memorization', float('nan')):.3f}.")
    return out


def _claims_lines(claims: dict[str, Any]) -> list[str]:
    lines = []
    for k, v in claims.items():
        detail = ", ".join(f"{a}={fmt_value(b, spec='.3g')}" for a, b in v.items() if a != "ok")
        lines.append(f"{'PASS' if v['ok'] else 'FAIL'} {k}: {detail}")
    return lines


TITLE = "mechfaith: toy model of mechanistic (un)faithfulness"


def report_html(run: ToyRun, out: Path, figs: dict[str, dict[str, str]]) -> str:
    """The page: claims, findings, the numbers, the scan, the figures (read from ``out``), the method."""
    m = run.metrics
    parts = ["<h1>Toy model of mechanistic (un)faithfulness</h1>", f"<p>{INTRO}</p>", "<h2>Claims</h2><ul>"]
    for line in _claims_lines(m["claims"]):
        cls = "pass" if line.startswith("PASS") else "fail"
        parts.append(f"<li class='{cls}'>{esc(line)}</li>")
    parts.append("</ul><h2>Findings</h2><ul>")
    parts += [f"<li>{esc(line)}</li>" for line in _findings(m["settings"])]
    parts += ["</ul><h2>Numbers</h2>", table_html(HEAD, _table_rows(m["settings"]))]
    scan = m["scan"]
    parts += ["<h3>Scan (memorization, rows: repeat_frac, columns: λ)</h3>",
              table_html(["rf \\ λ"] + [f"{c:g}" for c in scan["sparsity_coef"]],
                         [[f"{r:g}"] + [f"{v:.2f}" for v in row] for r, row in zip(scan["repeat_frac"], scan["memorization"])],
                         row_heads=True), "<h2>Figures</h2>"]
    parts += [figure_html(info["title"], (out / fn).read_bytes(), info["caption"]) for fn, info in figs.items()]
    parts.append("<h2>Definitions and method</h2><ul>")
    parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in m["definitions"].items()]
    t = m["timing"]
    parts.append(f"</ul><p>{t['n_coders']} coders trained together in {t['train_seconds']:.0f} s "
                 f"(total {t['total_seconds']:.0f} s); {t['dead_latents_resampled']} dead latents resampled.</p>")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps(m["config"], indent=1)) + "</pre>")
    return html_page(TITLE, "\n".join(parts), extra_css=".pass{color:#070}.fail{color:#b00}")


def write_html(run: ToyRun, out: Path, figs: dict[str, dict[str, str]]) -> None:
    """Write ``report.html`` into ``out`` atomically."""
    write_text_atomic(out / "report.html", report_html(run, out, figs))


def write_markdown(run: ToyRun, out: Path, figs: dict[str, dict[str, str]]) -> None:
    m = run.metrics
    lines = ["# Toy model of mechanistic (un)faithfulness", "",
             INTRO.replace("<em>", "*").replace("</em>", "*"), "", "## Claims", ""]
    lines += [f"- {line}" for line in _claims_lines(m["claims"])]
    lines += ["", "## Findings", ""] + [f"- {line}" for line in _findings(m["settings"])]
    lines += ["", "## Numbers", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(m["settings"])]
    scan = m["scan"]
    lines += ["", "### Scan (memorization; rows repeat_frac, columns λ)", "",
              "| rf \\ λ | " + " | ".join(f"{c:g}" for c in scan["sparsity_coef"]) + " |",
              "|---|" + "---|" * len(scan["sparsity_coef"])]
    for r, row in zip(scan["repeat_frac"], scan["memorization"]):
        lines.append(f"| {r:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    sp = scan["spearman"]
    lines += ["", f"Spearman(memorization, repeat_frac·λ) = {fmt_value(sp['product'], spec='.3g')}; "
                  f"with repeat_frac = {fmt_value(sp['repeat_frac'], spec='.3g')}; "
                  f"with λ = {fmt_value(sp['sparsity_coef'], spec='.3g')}.",
              "", "## Figures", ""]
    for fn, info in figs.items():
        lines += [f"### {info['title']}", "", f"![{info['title']}]({fn})", "", info["caption"], ""]
    lines += ["## Definitions and method", ""]
    lines += [f"- **{k}**: {v}" for k, v in m["definitions"].items()]
    t = m["timing"]
    lines += ["", f"{t['n_coders']} coders trained together in {t['train_seconds']:.0f} s "
                  f"(total {t['total_seconds']:.0f} s).", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def write_toy_outputs(run: ToyRun, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write metrics.json, the PNGs, report.html and report.md into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(run, out)
    write_text_atomic(out / "metrics.json", json.dumps(json_safe(run.metrics), indent=2, sort_keys=True) + "\n")
    write_html(run, out, figs)
    write_markdown(run, out, figs)
    paths = {"metrics": out / "metrics.json", "html": out / "report.html", "markdown": out / "report.md"}
    paths.update({fn: out / fn for fn in figs})
    return paths
