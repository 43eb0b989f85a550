"""The faithfulness report as a self-contained HTML page (figures embedded as PNG data URIs).

Input: the dict written as ``faithfulness.json`` by :func:`mechfaith.faithfulness.report.faithfulness_report`
(or :func:`mechfaith.lm.faithfulness.lm_faithfulness`). :func:`write_faithfulness_html` renders
it; missing sections are skipped, so partial reports render too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechfaith.atomic import write_text_atomic  # noqa: E402

E = html.escape


def _png(fig: "plt.Figure") -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)) else float("nan")


def _fmt(v: Any, se: Any = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    s = f"{v:.4g}" if isinstance(v, float) else str(v)
    if isinstance(se, (int, float)) and math.isfinite(se):
        s += f" ± {se:.2g}"
    return s


# ---------------------------------------------------------------------- figures
def jacobian_figure(jac: dict[str, Any]) -> str:
    names = list(jac)
    vals = [_num(jac[n]["rel_error"]) for n in names]
    errs = [_num(jac[n]["rel_error_se"]) for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(names, vals, yerr=[0 if math.isnan(e) else e for e in errs], capsize=4, color="C0")
    ax.set_ylabel("E||J_mlp v - J_tc v||² / E||J_mlp v||²")
    ax.set_title("Jacobian relative error (± SE)", fontsize=9)
    return _png(fig)


def spectra_figure(spectra: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    for key, label, color in (("reference", "MLP", "C3"), ("coder", "transcoder", "C0")):
        s = np.array([_num(v) for v in spectra[key]["mean_normalized"]])
        ax.plot(np.arange(1, len(s) + 1), np.clip(s, 1e-8, None), label=label, color=color)
    ax.axvline(spectra["reference"]["top_k"], color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_k / σ_1 (mean over inputs)")
    ax.set_title(f"Jacobian spectra on {spectra['n_inputs']} inputs (dotted: head/tail split)", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def datapoints_figure(dp: dict[str, Any]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    h = dp["top_share_histogram"]
    edges = h["edges"]
    axes[0].bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="C7", edgecolor="k", lw=0.3)
    axes[0].set_yscale("symlog")
    axes[0].set_xlabel("share of top activations from one repeated input")
    axes[0].set_ylabel("features")
    axes[0].set_title(f"{dp['n_judged']} features judged", fontsize=9)
    cands = dp["candidates"]
    ms = [_num(c["mass_share"]) for c in cands]
    mr = [_num(c["memorization_rel"]) for c in cands]
    col = ["C3" if c["flagged"] else "C0" for c in cands]
    axes[1].scatter(ms, mr, c=col, s=18)
    cfg = dp["config"]
    axes[1].axvline(cfg["mass_threshold"], color="gray", ls=":", lw=1)
    axes[1].axhline(cfg["memorization_threshold"], color="gray", ls=":", lw=1)
    axes[1].set_xlim(-0.02, 1.02)
    axes[1].set_xlabel("activation mass from the repeated input")
    axes[1].set_ylabel("memorization / ||y*||")
    axes[1].set_title(f"{len(cands)} candidates, {dp['n_flagged']} flagged (red)", fontsize=9)
    return _png(fig)


def offdist_figure(off: dict[str, Any]) -> str:
    sets = off["sets"]
    names = list(sets)
    pos = np.arange(len(names))
    r = [_num(sets[n]["rel_error_ratio"]) for n in names]
    r_se = [_num(sets[n].get("rel_error_ratio_se")) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(pos - 0.2, r, 0.4, yerr=[0 if math.isnan(e) else e for e in r_se], capsize=3, label="output error")
    if all("jacobian_ratio" in sets[n] for n in names):
        ax.bar(pos + 0.2, [_num(sets[n]["jacobian_ratio"]) for n in names], 0.4, label="Jacobian error")
    ax.axhline(1, color="k", lw=0.6)
    ax.set_xticks(pos, names, fontsize=7, rotation=20)
    ax.set_ylabel("ratio to on-distribution")
    ax.set_yscale("log")
    ax.set_title("transcoder vs MLP error off distribution", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def masking_figure(mask: dict[str, Any]) -> str:
    pf = mask["per_feature"]
    bz = np.array([_num(v) for v in pf["bias_z"]])
    wr = np.array([_num(v) for v in pf["weight_ratio"]])
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
    return _png(fig)


# ---------------------------------------------------------------------- page
def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{E(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{E(str(c))}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _figure(title: str, data: str, caption: str) -> str:
    return (f"<figure><h3>{E(title)}</h3><img alt='{E(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{E(caption)}</figcaption></figure>")


def faithfulness_html(rep: dict[str, Any], title: str = "Faithfulness report") -> str:
    """The page for one report dict (see the module docstring)."""
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>", f"<title>{E(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #bbb;"
             "padding:3px 6px}th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
             "figcaption{font-size:13px;color:#444;max-width:900px}pre{background:#f6f6f6;padding:.5em;"
             "font-size:11px;overflow-x:auto}</style></head><body>", f"<h1>{E(title)}</h1>"]
    lm = rep.get("lm")
    coder = rep.get("coder", {})
    if lm:
        parts.append(f"<p>Model <b>{E(str(lm['model']))}</b>, layer {lm['layer']} ({E(lm['input_site'])} → "
                     f"{E(lm['output_site'])}); coder <code>{E(lm['coder'])}</code>. Held-out tokens: "
                     f"{lm['eval_tokens']} from {E(lm['eval_source'])}.</p>")
    parts.append(f"<p>Coder: {coder.get('n_latents')} latents, {E(str(coder.get('activation')))}"
                 f"{' (k=' + str(coder.get('k')) + ')' if coder.get('activation') in ('topk', 'batchtopk') else ''}"
                 f"{', linear skip' if coder.get('skip') else ''}.</p>")
    fid = rep.get("fidelity", {})
    jac = rep.get("jacobian", {})
    if fid or jac:
        parts.append("<h2>Reconstruction and Jacobian agreement</h2>")
        rows = []
        for g in dict.fromkeys([*fid, *jac]):
            f, j = fid.get(g, {}), jac.get(g, {})
            rows.append([g, j.get("n_inputs", f.get("n", "")), _fmt(f.get("fve")), _fmt(f.get("l0")),
                         _fmt(j.get("rel_error"), j.get("rel_error_se"))])
        parts.append(_table(["rows", "n", "FVE", "L0", "Jacobian rel. error ± SE"], rows))
        if jac:
            parts.append(_figure("Jacobian relative error", jacobian_figure(jac),
                                 "JVP estimate with Gaussian probes: E||J_mlp v − J_tc v||² / E||J_mlp v||², "
                                 "a ratio of means over inputs with its delta-method standard error."))
    sp = rep.get("spectra")
    if sp:
        parts.append("<h2>Jacobian spectra</h2>")
        rows = [[name, _fmt(sp[key]["effective_rank"]), _fmt(sp[key]["numerical_rank"]),
                 _fmt(sp[key]["tail_mass"]), _fmt(sp[key]["mean_top_singular_value"])]
                for key, name in (("reference", "MLP"), ("coder", "transcoder"))]
        parts.append(_table(["", "effective rank", "numerical rank", f"tail mass beyond top {sp['reference']['top_k']}",
                             "mean σ_1"], rows))
        parts.append(f"<p>Exact relative Frobenius error on these inputs: "
                     f"{_fmt(sp.get('frobenius_rel_error_exact'))}.</p>")
        parts.append(_figure("Singular values of the exact Jacobians", spectra_figure(sp),
                             "An MLP in superposition has a long tail of small singular values; a sparse "
                             "transcoder's Jacobian has rank at most its active latents plus its skip."))
    dp = rep.get("datapoints")
    if dp:
        parts.append("<h2>Datapoint features</h2>")
        parts.append(f"<p>{dp['n_flagged']} flagged of {dp['n_latents']} latents ({dp['n_judged']} judged, "
                     f"{dp['n_candidates']} candidates) on {dp['n_rows']} rows.</p>")
        rows = [[c["index"], c["n_active"], _fmt(c["top_share"]), _fmt(c["mass_share"]),
                 _fmt(c["output_share"]), _fmt(c["memorization_rel"]), "yes" if c["flagged"] else "no"]
                for c in dp["candidates"][:30]]
        if rows:
            parts.append(_table(["feature", "active rows", "top share", "mass share", "output share",
                                 "memorization/||y*||", "flagged"], rows))
        parts.append(_figure("Datapoint-feature detector", datapoints_figure(dp),
                             "Left: per feature, the share of its top activations from one group of "
                             "identical or near-identical inputs. Right: candidates; flagged when most of "
                             "the activation mass comes from the repeated input and the feature writes "
                             "that input's own output beyond any single generic direction."))
    off = rep.get("offdist")
    if off:
        parts.append("<h2>Off-distribution behaviour</h2>")
        rows = [[n, s["n"], _fmt(s["rel_error"], s.get("rel_error_se")), _fmt(s["rel_error_ratio"]),
                 _fmt(s.get("jacobian_rel_error"), s.get("jacobian_rel_error_se")), _fmt(s.get("jacobian_ratio"))]
                for n, s in off["sets"].items()]
        parts.append(_table(["set", "n", "output rel. error (FVU)", "ratio", "Jacobian rel. error",
                             "ratio"], rows))
        parts.append(_figure("Error ratios off distribution", offdist_figure(off), off.get("definition", "")))
    mk = rep.get("masking")
    if mk:
        parts.append("<h2>Gradient-masking signs</h2>")
        parts.append(f"<p>{mk['n_flagged']} flagged; median ||W_enc,i|| ||W_dec,i|| = "
                     f"{_fmt(mk['median_weight_product'])}, largest ratio to it {_fmt(mk['max_weight_ratio'])}.</p>")
        if mk["flagged"]:
            parts.append(_table(["feature", "weight ratio", "bias", "bias z", "firing rate"],
                                [[m["index"], _fmt(m["weight_ratio"]), _fmt(m["bias"]), _fmt(m["bias_z"]),
                                  _fmt(m["firing_rate"])] for m in mk["flagged"][:30]]))
        parts.append(_figure("Weights vs bias per feature", masking_figure(mk),
                             "Flagged: weight product at least the threshold times the median, bias at "
                             "most the threshold in standard deviations, and rarely firing."))
    if rep.get("timings_s"):
        parts.append("<p>Timings (s): " + E(", ".join(f"{k} {v}" for k, v in rep["timings_s"].items())) + "</p>")
    cfg = {k: rep[k] for k in ("config",) if k in rep}
    if lm:
        cfg["lm"] = {k: v for k, v in lm.items() if k in ("config", "corpus", "detector", "offdist")}
    parts.append("<h2>Configuration</h2><pre>" + E(json.dumps(cfg, indent=1, sort_keys=True)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_faithfulness_html(rep: dict[str, Any], path: str | os.PathLike[str],
                            title: str = "Faithfulness report") -> None:
    """Write the page atomically."""
    write_text_atomic(path, faithfulness_html(rep, title))
