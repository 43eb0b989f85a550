"""Figures of the multi-hop toy report, each written atomically as a PNG."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.reports.figures import pyplot, save_figure
from mechfaith.toy.multihop_model import MultihopNet

SUMMARY_PANELS = (("cross_layer_share", "cross-layer share\n(written by earlier layers)"),
                  ("intermediate_read_share", "intermediate-read share\n(writers read h[k,t])"),
                  ("ablation_response", "ablation response\n(1 = follows the real MLP)"),
                  ("later_jacobian_rel_error", "local Jacobian error,\nlayers >= 1 (relative)"))


def summary_figure(settings: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """One panel per headline number: a bar per setting (mean) with each seed as a dot."""
    plt = pyplot()
    names = list(settings)
    fig, axes = plt.subplots(1, len(SUMMARY_PANELS), figsize=(3.2 * len(SUMMARY_PANELS), 3.6))
    for ax, (key, label) in zip(axes, SUMMARY_PANELS):
        means = [settings[n][key]["mean"] for n in names]
        ax.bar(range(len(names)), means, color=[f"C{i}" for i in range(len(names))], alpha=0.7)
        for i, n in enumerate(names):
            seeds = settings[n][key]["seeds"]
            ax.scatter(np.full(len(seeds), i) + np.linspace(-0.15, 0.15, len(seeds)), seeds, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def jacobian_layers_figure(settings: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Grouped bars: the relative local Jacobian error of each layer, per setting (mean over seeds)."""
    plt = pyplot()
    names = list(settings)
    n_layers = len(settings[names[0]]["jacobian_rel_error_per_layer"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 * n_layers + 4, 3.4))
    for i, n in enumerate(names):
        vals = settings[n]["jacobian_rel_error_per_layer"]
        ax.bar(np.arange(n_layers) + (i - (len(names) - 1) / 2) * width, vals, width, label=n, color=f"C{i}")
    ax.set_xticks(range(n_layers), [f"layer {t}" for t in range(n_layers)])
    ax.set_ylabel("E||J_t - J_MLP_t||² / E||J_MLP_t||²", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Local Jacobian error per layer (mean over seeds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def weights_figure(clt: CrossLayerTranscoder, net: MultihopNet, alive: torch.Tensor, title: str,
                   path: str | os.PathLike[str]) -> None:
    """Rows: the live latents (layer:index). Left: what each reads (encoder . E[j] for the features
    present at its layer; grey where the feature is not in that layer's input). Right: what it
    writes (decoder to layer t . E[h[k, t+1]], the feature MLP_t computes)."""
    plt = pyplot()
    lay, E, L = net.layout, net.E, net.n_layers
    names = lay.names()
    write_cols = [(t, k) for t in range(L) for k in range(lay.n_chains)]
    rows, reads, writes = [], [], []
    with torch.no_grad():
        for s in range(L):
            enc = (E @ clt.W_enc[s]).T  # [n, F]
            for i in torch.nonzero(alive[s]).flatten().tolist():
                r = enc[i].clone()
                r[[lay.h(k, m) for k in range(lay.n_chains) for m in range(s + 1, L + 1)]] = float("nan")
                w = [float(clt.decoder_to(s, t)[i] @ E[lay.h(k, t + 1)]) if t >= s and t in
                     range(s, s + clt.cfg.n_targets(s)) else float("nan") for t, k in write_cols]
                rows.append(f"L{s}:{i}")
                reads.append(r.numpy())
                writes.append(w)
    if not rows:
        rows, reads, writes = ["(none)"], [np.full(len(names), np.nan)], [[np.nan] * len(write_cols)]
    R, W = np.array(reads), np.array(writes)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.32 * len(rows) + 1.8),
                                 gridspec_kw={"width_ratios": [len(names), len(write_cols) + 1]})
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#ddd")
    vr = max(1.0, float(np.nanmax(np.abs(R))) if np.isfinite(R).any() else 1.0)
    vw = max(1.0, float(np.nanmax(np.abs(W))) if np.isfinite(W).any() else 1.0)
    a1.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=-vr, vmax=vr, aspect="auto", interpolation="nearest")
    a1.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    a1.set_yticks(range(len(rows)), rows, fontsize=7)
    a1.set_title("reads: W_enc . E[feature]", fontsize=9)
    im = a2.imshow(np.ma.masked_invalid(W), cmap=cmap, vmin=-vw, vmax=vw, aspect="auto", interpolation="nearest")
    a2.set_xticks(range(len(write_cols)), [f"→L{t} {names[lay.h(k, t + 1)]}" for t, k in write_cols],
                  rotation=90, fontsize=7)
    a2.set_yticks(range(len(rows)), rows, fontsize=7)
    a2.set_title("writes: W_dec[s→t] . E[h]", fontsize=9)
    for (r, c), v in np.ndenumerate(W):
        if np.isfinite(v) and abs(v) > 0.1:
            a2.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=a2, fraction=0.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
