"""The multi-hop toy report: metrics.json, PNG figures, a self-contained report.html and report.md
(every file written atomically; the HTML embeds the figures as ``data:`` URIs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mechfaith.atomic import write_text_atomic
from mechfaith.jsonio import json_safe
from mechfaith.reports import multihop_plots as plots
from mechfaith.reports.page import esc, figure_html, html_page, table_html
from mechfaith.toy.multihop import MultihopRun
from mechfaith.toy.multihop_data import all_patterns

TITLE = "mechfaith: the multi-hop toy (do cross-layer transcoders take shortcuts?)"
COLUMNS = (("cross_layer_share", "cross-layer share"), ("intermediate_read_share", "intermediate-read share"),
           ("ablation_response", "ablation response"), ("ablation_error", "ablation error"),
           ("injection_response", "injection response"), ("later_jacobian_rel_error", "local Jacobian error (layers ≥ 1)"),
           ("fvu", "FVU"), ("l0", "L0 (all layers)"))


def intro(run: MultihopRun) -> list[str]:
    """The paragraphs that say what was run (plain text)."""
    cfg, lay = run.config, run.net.layout
    return [
        "After Lange et al. (2025): a cross-layer transcoder (CLT) can replace a deep, multi-step circuit by a "
        "shallow shortcut that reads the raw inputs, and the sparsity penalty may push it to. Ground truth: a "
        f"residual network of {cfg.n_layers} layers, x_(l+1) = x_l + MLP_l(x_l), with {cfg.n_chains} independent "
        "chains of ANDs. Chain k has boolean inputs a[k,0..L] (each 1 with probability "
        f"{cfg.density:g}) in orthonormal residual directions; MLP_0 computes h[k,1] = AND(a[k,0], a[k,1]) and "
        "MLP_l computes h[k,l+1] = AND(h[k,l], a[k,l+1]), reading h[k,l] from the residual stream where MLP_(l-1) "
        "wrote it. Each AND is one ReLU neuron 2 ReLU(u + v - 1.5). "
        f"{lay.n_features} features, d_model = {run.net.d_model}.",
        f"Replacements ({cfg.seeds} seeds each, {cfg.n_latents} ReLU latents per layer, tanh-L1 with c = "
        f"{cfg.tanh_c:g} on f ||W_dec||, {cfg.steps} steps): per-layer transcoders (a reach-0 CLT), full CLTs "
        "without Jacobian matching at each sparsity λ, and a full CLT with local-Jacobian matching. Every number "
        "is an exact expectation over all input patterns; means ± std over seeds, per-seed values in the "
        "tables and metrics.json."]


def _row(name: str, s: dict[str, Any]) -> list[str]:
    sp = s["spec"]
    desc = ("per-layer" if sp["reach"] == 0 else "CLT") + f", λ={sp['sparsity_coef']:g}" + \
        (f", Jacobian {sp['jacobian_coef']:g}" if sp["jacobian_coef"] else "")
    cells = [name, desc]
    for key, _ in COLUMNS:
        v = s[key]
        cells.append(f"{v['mean']:.3f} ± {v['std']:.3f} [" + ", ".join(f"{x:.2f}" for x in v["seeds"]) + "]")
    return cells


def _claim_lines(claims: dict[str, Any]) -> list[tuple[bool, str]]:
    out = []
    for key, c in claims.items():
        nums = []
        for k, v in c.items():
            if k in ("claim", "ok", "verdict"):
                continue
            if isinstance(v, dict) and "mean" in v:
                nums.append(f"{k} {v['mean']:.3f} (seeds " + ", ".join(f"{x:.2f}" for x in v["seeds"]) + ")")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                nums.append(f"{k} " + "; ".join(f"{x['mean']:.3f} (seeds " + ", ".join(f"{y:.2f}" for y in x["seeds"])
                                                + ")" for x in v))
            else:
                nums.append(f"{k} {v}")
        out.append((c["ok"], f"{c['verdict'].upper()} — {key}: {c['claim']}. Measured: " + "; ".join(nums)))
    return out


def _target_rows(run: MultihopRun) -> list[list[str]]:
    rows = []
    for name, m in run.measures.items():
        for t in m.targets:
            rows.append([name, t.feature, str(t.layer), f"{t.cross_layer_share:.2f}", f"{t.intermediate_read_share:.2f}",
                         f"{t.ablation_response:.2f}", f"{t.injection_response:.2f}",
                         ", ".join(f"{v:.3f}" for v in t.write_by_source)])
    return rows


TARGET_HEAD = ["setting", "target", "layer", "cross-layer share", "intermediate-read share", "ablation response",
               "injection response", "write by source layer 0..t"]


def figures(run: MultihopRun, out: Path) -> dict[str, dict[str, str]]:
    """Write every PNG; return {file name: {title, caption}} in display order."""
    s = run.metrics["settings"]
    figs: dict[str, dict[str, str]] = {}
    plots.summary_figure(s, out / "summary.png")
    figs["summary.png"] = {"title": "Shortcut measures per setting",
                           "caption": "Bars: means over seeds; dots: seeds. A faithful replacement has cross-layer "
                                      "share 0, intermediate-read share 1, ablation response 1 and local Jacobian "
                                      "error 0; the hand-built shortcut has 1, 0, 0 and 1."}
    plots.jacobian_layers_figure(s, out / "jacobian_per_layer.png")
    figs["jacobian_per_layer.png"] = {
        "title": "Local Jacobian error per layer",
        "caption": "E||J_t − J_MLP_t||²_F / E||J_MLP_t||²_F: J_t is the replacement's Jacobian of its layer-t output "
                   "with respect to layer t's input, earlier layers' inputs held. A shortcut writes layer t from "
                   "earlier layers' latents, which J_t does not see."}
    a, _ = all_patterns(run.net.layout.n_inputs, run.config.density)
    x, _ = run.net.run(a)
    for name, clt in run.examples.items():
        with torch.no_grad():
            alive = clt.forward_full(x).mask.any(dim=1)
        fn = f"weights_{name}.png"
        plots.weights_figure(clt, run.net, alive, f"{name} (seed {run.config.seed})", out / fn)
        figs[fn] = {"title": f"What each live latent reads and writes: {name}",
                    "caption": "Rows: latents that fire on some input (layer:index). Left: encoder weight on each "
                               "feature direction (grey: the feature is not yet in that layer's input). Right: "
                               "decoder weight onto each MLP output feature h at each target layer. A faithful "
                               "latent of layer t reads h[k,t] and a[k,t+1] and writes h[k,t+1] at layer t; a "
                               "shortcut latent of layer 0 reads a[k,0..t+1] and writes at layer t."}
    return figs


def report_html(run: MultihopRun, out: Path, figs: dict[str, dict[str, str]]) -> str:
    m = run.metrics
    parts = ["<h1>The multi-hop toy: do cross-layer transcoders take shortcuts?</h1>"]
    parts += [f"<p>{esc(p)}</p>" for p in intro(run)]
    parts.append("<h2>Claims</h2><ul>")
    parts += [f"<li class='{'pass' if ok else 'fail'}'>{esc(line)}</li>" for ok, line in _claim_lines(m["claims"])]
    parts += ["</ul><h2>Numbers (mean ± std [per seed])</h2>",
              table_html(["setting", "replacement"] + [c for _, c in COLUMNS],
                         [_row(n, s) for n, s in m["settings"].items()]),
              f"<h3>Per target (seed {run.config.seed})</h3>", table_html(TARGET_HEAD, _target_rows(run)),
              "<h2>Figures</h2>"]
    parts += [figure_html(i["title"], (out / fn).read_bytes(), i["caption"]) for fn, i in figs.items()]
    parts.append("<h2>Definitions</h2><ul>")
    parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in m["definitions"].items()]
    t = m["timing"]
    parts.append(f"</ul><p>{t['n_replacements']} replacements trained together in {t['train_seconds']:.0f} s "
                 f"(total {t['total_seconds']:.0f} s).</p>")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps(m["config"], indent=1)) + "</pre>")
    return html_page(TITLE, "\n".join(parts), extra_css=".pass{color:#070}.fail{color:#b00}")


def report_markdown(run: MultihopRun, figs: dict[str, dict[str, str]]) -> str:
    m = run.metrics
    head = ["setting", "replacement"] + [c for _, c in COLUMNS]
    lines = ["# The multi-hop toy: do cross-layer transcoders take shortcuts?", ""] + \
        [p + "\n" for p in intro(run)] + ["## Claims", ""]
    lines += [f"- {line}" for _, line in _claim_lines(m["claims"])]
    lines += ["", "## Numbers (mean ± std [per seed])", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row(n, s)) + " |" for n, s in m["settings"].items()]
    lines += ["", "## Figures", ""]
    for fn, info in figs.items():
        lines += [f"### {info['title']}", "", f"![{info['title']}]({fn})", "", info["caption"], ""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in m["definitions"].items()] + [""]
    return "\n".join(lines)


def write_multihop_outputs(run: MultihopRun, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write metrics.json, the PNGs, report.html and report.md into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(run, out)
    write_text_atomic(out / "metrics.json", json.dumps(json_safe(run.metrics), indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / "report.html", report_html(run, out, figs))
    write_text_atomic(out / "report.md", report_markdown(run, figs))
    paths = {"metrics": out / "metrics.json", "html": out / "report.html", "markdown": out / "report.md"}
    paths.update({fn: out / fn for fn in figs})
    return paths
