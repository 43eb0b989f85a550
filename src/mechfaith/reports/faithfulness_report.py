"""The faithfulness report as a self-contained HTML page (figures embedded as PNG data URIs).

Input: the dict written as ``faithfulness.json`` by :func:`mechfaith.faithfulness.report.faithfulness_report`
(or :func:`mechfaith.lm.faithfulness.lm_faithfulness`). :func:`write_faithfulness_html` renders
it; missing sections are skipped, so partial reports render too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from mechfaith.atomic import write_text_atomic
from mechfaith.reports.figures import png_bytes, pyplot
from mechfaith.reports.page import esc, figure_html, html_page, table_html
from mechfaith.reports.values import as_float, fmt_value


# ---------------------------------------------------------------------- figures
def jacobian_figure(jac: dict[str, Any]) -> bytes:
    plt = pyplot()
    names = list(jac)
    vals = [as_float(jac[n]["rel_error"]) for n in names]
    errs = [as_float(jac[n]["rel_error_se"]) for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(names, vals, yerr=[0 if np.isnan(e) else e for e in errs], capsize=4, color="C0")
    ax.set_ylabel("E||J_mlp v - J_tc v||² / E||J_mlp v||²")
    ax.set_title("Jacobian relative error (± SE)", fontsize=9)
    return png_bytes(fig)


def spectra_figure(spectra: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    for key, label, color in (("reference", "MLP", "C3"), ("coder", "transcoder", "C0")):
        s = np.array([as_float(v) for v in spectra[key]["mean_normalized"]])
        ax.plot(np.arange(1, len(s) + 1), np.clip(s, 1e-8, None), label=label, color=color)
    ax.axvline(spectra["reference"]["top_k"], color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_k / σ_1 (mean over inputs)")
    ax.set_title(f"Jacobian spectra on {spectra['n_inputs']} inputs (dotted: head/tail split)", fontsize=9)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def datapoints_figure(dp: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    h = dp["top_share_histogram"]
    edges = h["edges"]
    axes[0].bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="C7", edgecolor="k", lw=0.3)
    axes[0].set_yscale("symlog")
    axes[0].set_xlabel("share of top activations from one repeated input")
    axes[0].set_ylabel("features")
    axes[0].set_title(f"{dp['n_judged']} features judged", fontsize=9)
    cands = dp["candidates"]
    ms = [as_float(c["mass_share"]) for c in cands]
    mr = [as_float(c["memorization_rel"]) for c in cands]
    col = ["C3" if c["flagged"] else "C0" for c in cands]
    axes[1].scatter(ms, mr, c=col, s=18)
    cfg = dp["config"]
    axes[1].axvline(cfg["mass_threshold"], color="gray", ls=":", lw=1)
    axes[1].axhline(cfg["memorization_threshold"], color="gray", ls=":", lw=1)
    axes[1].set_xlim(-0.02, 1.02)
    axes[1].set_xlabel("activation mass from the repeated input")
    axes[1].set_ylabel("memorization / ||y*||")
    axes[1].set_title(f"{len(cands)} candidates, {dp['n_flagged']} flagged (red)", fontsize=9)
    return png_bytes(fig)


def offdist_figure(off: dict[str, Any]) -> bytes:
    plt = pyplot()
    sets = off["sets"]
    names = list(sets)
    pos = np.arange(len(names))
    r = [as_float(sets[n]["rel_error_ratio"]) for n in names]
    r_se = [as_float(sets[n].get("rel_error_ratio_se")) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(pos - 0.2, r, 0.4, yerr=[0 if np.isnan(e) else e for e in r_se], capsize=3, label="output error")
    if all("jacobian_ratio" in sets[n] for n in names):
        ax.bar(pos + 0.2, [as_float(sets[n]["jacobian_ratio"]) for n in names], 0.4, label="Jacobian error")
    ax.axhline(1, color="k", lw=0.6)
    ax.set_xticks(pos, names, fontsize=7, rotation=20)
    ax.set_ylabel("ratio to on-distribution")
    ax.set_yscale("log")
    ax.set_title("transcoder vs MLP error off distribution", fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def masking_figure(mask: dict[str, Any]) -> bytes:
    plt = pyplot()
    pf = mask["per_feature"]
    bz = np.array([as_float(v) for v in pf["bias_z"]])
    wr = np.array([as_float(v) for v in pf["weight_ratio"]])
    flagged = np.zeros(len(bz), dtype=bool)
    for m in mask["flagged"]:
        flagged[m["index"]] = True
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    ok = np.isfinite(bz) & np.isfinite(wr) & (wr > 0)
    ax.scatter(bz[ok & ~flagged], wr[ok & ~flagged], s=6, alpha=0.5, color="C0", label="features")
    ax.scatter(bz[ok & flagged], wr[ok & flagged], s=24, color="C3", label="flagged")
    cfg = mask["config"]
    ax.axvline(cfg["bias_z_threshold"], color="gray", ls=":", lw=1)
    ax.axhline(cfg["weight_ratio_threshold"], color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("encoder bias / std of input projection")
    ax.set_ylabel("||W_enc,i|| ||W_dec,i|| / median")
    ax.set_title("gradient masking: top-left corner = large weights, very negative bias", fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(fig)


# ---------------------------------------------------------------------- page sections
def _intro(rep: dict[str, Any]) -> list[str]:
    lm, coder = rep.get("lm"), rep.get("coder", {})
    parts = []
    if lm:
        parts.append(f"<p>Model <b>{esc(lm['model'])}</b>, layer {lm['layer']} ({esc(lm['input_site'])} → "
                     f"{esc(lm['output_site'])}); coder <code>{esc(lm['coder'])}</code>. Held-out tokens: "
                     f"{lm['eval_tokens']} from {esc(lm['eval_source'])}.</p>")
    k = f" (k={coder.get('k')})" if coder.get("activation") in ("topk", "batchtopk") else ""
    parts.append(f"<p>Coder: {coder.get('n_latents')} latents, {esc(coder.get('activation'))}{k}"
                 f"{', linear skip' if coder.get('skip') else ''}.</p>")
    return parts


def _agreement(fid: dict[str, Any], jac: dict[str, Any]) -> list[str]:
    rows = []
    for g in dict.fromkeys([*fid, *jac]):
        f, j = fid.get(g, {}), jac.get(g, {})
        rows.append([g, j.get("n_inputs", f.get("n", "")), fmt_value(f.get("fve")), fmt_value(f.get("l0")),
                     fmt_value(j.get("rel_error"), j.get("rel_error_se"))])
    parts = ["<h2>Reconstruction and Jacobian agreement</h2>",
             table_html(["rows", "n", "FVE", "L0", "Jacobian rel. error ± SE"], rows)]
    if jac:
        parts.append(figure_html("Jacobian relative error", jacobian_figure(jac),
                                 "JVP estimate with Gaussian probes: E||J_mlp v − J_tc v||² / E||J_mlp v||², "
                                 "a ratio of means over inputs with its delta-method standard error."))
    return parts


def _spectra(sp: dict[str, Any]) -> list[str]:
    rows = [[name, fmt_value(sp[key]["effective_rank"]), fmt_value(sp[key]["numerical_rank"]),
             fmt_value(sp[key]["tail_mass"]), fmt_value(sp[key]["mean_top_singular_value"])]
            for key, name in (("reference", "MLP"), ("coder", "transcoder"))]
    head = ["", "effective rank", "numerical rank", f"tail mass beyond top {sp['reference']['top_k']}", "mean σ_1"]
    return ["<h2>Jacobian spectra</h2>", table_html(head, rows),
            f"<p>Exact relative Frobenius error on these inputs: {fmt_value(sp.get('frobenius_rel_error_exact'))}.</p>",
            figure_html("Singular values of the exact Jacobians", spectra_figure(sp),
                        "An MLP in superposition has a long tail of small singular values; a sparse "
                        "transcoder's Jacobian has rank at most its active latents plus its skip.")]


def _datapoints(dp: dict[str, Any]) -> list[str]:
    parts = ["<h2>Datapoint features</h2>",
             f"<p>{dp['n_flagged']} flagged of {dp['n_latents']} latents ({dp['n_judged']} judged, "
             f"{dp['n_candidates']} candidates) on {dp['n_rows']} rows.</p>"]
    rows = [[c["index"], c["n_active"], fmt_value(c["top_share"]), fmt_value(c["mass_share"]),
             fmt_value(c["output_share"]), fmt_value(c["memorization_rel"]), "yes" if c["flagged"] else "no"]
            for c in dp["candidates"][:30]]
    if rows:
        parts.append(table_html(["feature", "active rows", "top share", "mass share", "output share",
                                 "memorization/||y*||", "flagged"], rows))
    parts.append(figure_html("Datapoint-feature detector", datapoints_figure(dp),
                             "Left: per feature, the share of its top activations from one group of "
                             "identical or near-identical inputs. Right: candidates; flagged when most of "
                             "the activation mass comes from the repeated input and the feature writes "
                             "that input's own output beyond any single generic direction."))
    return parts


def _offdist(off: dict[str, Any]) -> list[str]:
    rows = [[n, s["n"], fmt_value(s["rel_error"], s.get("rel_error_se")), fmt_value(s["rel_error_ratio"]),
             fmt_value(s.get("jacobian_rel_error"), s.get("jacobian_rel_error_se")), fmt_value(s.get("jacobian_ratio"))]
            for n, s in off["sets"].items()]
    return ["<h2>Off-distribution behaviour</h2>",
            table_html(["set", "n", "output rel. error (FVU)", "ratio", "Jacobian rel. error", "ratio"], rows),
            figure_html("Error ratios off distribution", offdist_figure(off), off.get("definition", ""))]


def _masking(mk: dict[str, Any]) -> list[str]:
    parts = ["<h2>Gradient-masking signs</h2>",
             f"<p>{mk['n_flagged']} flagged; median ||W_enc,i|| ||W_dec,i|| = "
             f"{fmt_value(mk['median_weight_product'])}, largest ratio to it {fmt_value(mk['max_weight_ratio'])}.</p>"]
    if mk["flagged"]:
        parts.append(table_html(["feature", "weight ratio", "bias", "bias z", "firing rate"],
                                [[m["index"], fmt_value(m["weight_ratio"]), fmt_value(m["bias"]),
                                  fmt_value(m["bias_z"]), fmt_value(m["firing_rate"])] for m in mk["flagged"][:30]]))
    parts.append(figure_html("Weights vs bias per feature", masking_figure(mk),
                             "Flagged: weight product at least the threshold times the median, bias at "
                             "most the threshold in standard deviations, and rarely firing."))
    return parts


def faithfulness_html(rep: dict[str, Any], title: str = "Faithfulness report") -> str:
    """The page for one report dict (see the module docstring)."""
    parts = [f"<h1>{esc(title)}</h1>", *_intro(rep)]
    fid, jac = rep.get("fidelity", {}), rep.get("jacobian", {})
    if fid or jac:
        parts += _agreement(fid, jac)
    for key, section in (("spectra", _spectra), ("datapoints", _datapoints), ("offdist", _offdist),
                         ("masking", _masking)):
        if rep.get(key):
            parts += section(rep[key])
    if rep.get("timings_s"):
        parts.append("<p>Timings (s): " + esc(", ".join(f"{k} {v}" for k, v in rep["timings_s"].items())) + "</p>")
    cfg = {k: rep[k] for k in ("config",) if k in rep}
    lm = rep.get("lm")
    if lm:
        cfg["lm"] = {k: v for k, v in lm.items() if k in ("config", "corpus", "detector", "offdist")}
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps(cfg, indent=1, sort_keys=True)) + "</pre>")
    return html_page(title, "\n".join(parts))


def write_faithfulness_html(rep: dict[str, Any], path: str | os.PathLike[str],
                            title: str = "Faithfulness report") -> None:
    """Write the page atomically."""
    write_text_atomic(path, faithfulness_html(rep, title))
